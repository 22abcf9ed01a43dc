"""Score IFEval-format files: strict and loose verdicts per prompt, and the four IFEval accuracies."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import follows, resolve_kwargs

TASK_KEY = "task"


class DataError(ValueError):
    """A malformed data file: the message names the file, the line and the fix."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; malformed lines raise `DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    # surrogateescape keeps a bad byte as a lone surrogate (valid UTF-8 never decodes to one), so it is named with
    # its line instead of failing mid-file in the decoder
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as exc:
                byte = ord(line[exc.start]) - 0xDC00
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 (byte {byte:#04x} at character {exc.start + 1}); save the file as UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}).") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}.")
            yield lineno, obj


def read_json_object(path: str | Path, what: str) -> dict:
    """A JSON file holding an object; anything else (not JSON, not UTF-8, a list) names the file and ``what`` it
    should be."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as JSON ({exc}); give {what}.") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a JSON {type(obj).__name__}, not an object; give {what}.")
    return obj


def check_instructions(where: str, ids, kwargs, prompt: str) -> None:
    """An input line's instruction ids and kwargs, checked against the checkers (IFEval files and if16 records)."""
    if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
        raise DataError(f"{where}: instruction_id_list and kwargs must be lists of equal length.")
    for iid, kw in zip(ids, kwargs, strict=True):
        try:
            resolve_kwargs(iid, kw, prompt)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None


def read_inputs(path: str | Path) -> list[dict]:
    """IFEval input lines ``{key, prompt, instruction_id_list, kwargs}`` (extra fields kept), validated."""
    records = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        for field in ("prompt", "instruction_id_list", "kwargs"):
            if field not in obj:
                raise DataError(
                    f"{where}: missing field {field!r} (IFEval input lines need key, prompt, instruction_id_list, kwargs)."
                )
        if not isinstance(obj["prompt"], str):
            raise DataError(f"{where}: 'prompt' must be a string, got {obj['prompt']!r}.")
        check_instructions(where, obj["instruction_id_list"], obj["kwargs"], obj["prompt"])
        obj.setdefault("key", obj["prompt"])
        records.append(obj)
    return records


def read_responses(path: str | Path) -> dict[str, str]:
    """Response lines ``{prompt, response}`` or ``{key, response}`` -> {prompt or str(key): response}."""
    out: dict[str, str] = {}
    for lineno, obj in read_jsonl(path):
        if "response" not in obj or not isinstance(obj["response"], str):
            raise DataError(f"{path}:{lineno}: missing string field 'response'.")
        if "prompt" not in obj and "key" not in obj:
            raise DataError(f"{path}:{lineno}: a response line needs 'prompt' or 'key' to match its input.")
        for field in ("prompt", "key"):
            if field in obj:
                out[f"{field}:{obj[field]}"] = obj["response"]
    return out


def match_responses(inputs: list[dict], responses: dict[str, str]) -> list[str]:
    """The response of each input (by key, else by prompt); raises listing every input without one."""
    found, missing = [], []
    for rec in inputs:
        r = responses.get(f"key:{rec['key']}", responses.get(f"prompt:{rec['prompt']}"))
        (missing.append(str(rec["key"])) if r is None else found.append(r))
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise DataError(f"no response for input key(s): {shown}. Every input needs a response line.")
    return found


def evaluate(inputs: list[dict], responses: list[str], *, loose: bool) -> list[dict]:
    """Per prompt: the reference's output fields (``follow_instruction_list``, ``follow_all_instructions``)."""
    rows = []
    for rec, response in zip(inputs, responses, strict=True):
        verdicts = [
            follows(iid, kw, response, prompt=rec["prompt"], loose=loose)
            for iid, kw in zip(rec["instruction_id_list"], rec["kwargs"], strict=True)
        ]
        row = {
            "key": rec["key"],
            "instruction_id_list": rec["instruction_id_list"],
            "prompt": rec["prompt"],
            "response": response,
            "follow_all_instructions": all(verdicts),
            "follow_instruction_list": verdicts,
        }
        if TASK_KEY in rec:
            row[TASK_KEY] = rec[TASK_KEY]
        rows.append(row)
    return rows


def _rate(passed: int, total: int) -> float:
    return passed / total if total else 0.0


def summarize(strict: list[dict], loose: list[dict]) -> dict[str, Any]:
    """IFEval's four accuracies (with counts) plus per instruction id, category and task (if present)."""
    summary: dict[str, Any] = {"num_prompts": len(strict), "num_instructions": 0}
    groups: dict[str, dict] = {"per_instruction": {}, "per_category": {}, "per_task": {}}
    for mode, rows in (("strict", strict), ("loose", loose)):
        prompt_pass = sum(r["follow_all_instructions"] for r in rows)
        inst_total = sum(len(r["follow_instruction_list"]) for r in rows)
        inst_pass = sum(sum(r["follow_instruction_list"]) for r in rows)
        summary[f"prompt_level_{mode}"] = _rate(prompt_pass, len(rows))
        summary[f"instruction_level_{mode}"] = _rate(inst_pass, inst_total)
        summary[f"prompt_level_{mode}_count"] = prompt_pass
        summary[f"instruction_level_{mode}_count"] = inst_pass
        summary["num_instructions"] = inst_total
        tallies: dict[str, dict[str, list[int]]] = {k: defaultdict(lambda: [0, 0]) for k in groups}
        for r in rows:
            for iid, ok in zip(r["instruction_id_list"], r["follow_instruction_list"], strict=True):
                for group, name in (("per_instruction", iid), ("per_category", iid.split(":")[0])):
                    tallies[group][name][0] += ok
                    tallies[group][name][1] += 1
            if TASK_KEY in r:  # a suite record's task succeeds when all its instructions are followed
                tallies["per_task"][r[TASK_KEY]][0] += r["follow_all_instructions"]
                tallies["per_task"][r[TASK_KEY]][1] += 1
        for group, table in tallies.items():
            for name, (passed, total) in sorted(table.items(), key=lambda kv: _natural(kv[0])):
                entry = groups[group].setdefault(name, {"total": total})
                entry[mode] = passed
                entry[f"{mode}_rate"] = _rate(passed, total)
    summary.update({k: v for k, v in groups.items() if v})
    return summary


def _natural(name: str) -> tuple:
    return (0, int(name[1:]), "") if name[:1] == "T" and name[1:].isdigit() else (1, 0, name)


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def score_files(input_path: str | Path, responses_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Score files and write ``eval_results_{strict,loose}.jsonl`` and ``summary.json`` to ``out_dir``.

    Everything is validated before anything is written.
    """
    inputs = read_inputs(input_path)
    responses = match_responses(inputs, read_responses(responses_path))
    strict = evaluate(inputs, responses, loose=False)
    loose = evaluate(inputs, responses, loose=True)
    summary = summarize(strict, loose)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "eval_results_strict.jsonl", strict)
    write_jsonl_atomic(out / "eval_results_loose.jsonl", loose)
    write_json_atomic(out / "summary.json", summary)
    return summary
