"""`unclutter eval`: any method on any benchmark file, batched, resumable, with metrics at the end.

A run directory holds ``config.json`` (the resolved settings; a rerun must match them),
``predictions.jsonl`` (one line per record, appended, flushed and fsynced after every batch, so a
killed run loses at most the batch in flight; a torn last line is cut off on resume),
``metrics.json`` and ``metrics.md``, and ``.unclutter-lock``: the folder has one writer at a time (a second run
into it is refused while the first lives; see `unclutter.runlock`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import apply
from ..ifeval import follows
from ..ifeval.scoring import summarize, write_json_atomic
from ..methods import resolve, to_dict
from ..metrics import circular_accuracy, gqa_match, mmbench_choice, mme_scores, vqa_accuracy
from ..runlock import RunLock
from .data import load_records
from .generation import ImagesRefused, build_prompt, generate, load_dtype, local_or_hub, resolve_device
from .images import open_image

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_ANSWER = "Answer with the option's letter from the given choices directly."
DESCRIBE = "Describe the image in detail."
DEFAULT_MAX_NEW_TOKENS = {"if16": 512}


def question_text(bench: str, rec: dict) -> str:
    """The question as LLaVA-1.5's evaluation asks it (with its answer-format suffix)."""
    if bench == "if16":
        return rec["prompt"]
    if bench == "mmbench":
        options = "\n".join(f"{k}. {v}" for k, v in rec["options"].items())
        hint = f"{rec['hint']}\n" if rec.get("hint") else ""
        return f"{hint}{rec['question']}\n{options}\n{OPTION_ANSWER}"
    return f"{rec['question']}\n{SHORT_ANSWER}"


def score_record(bench: str, rec: dict, prediction: str | None) -> dict[str, Any]:
    """Per-record scores (an error row scores zero)."""
    p = prediction or ""
    if bench in ("vqav2", "textvqa"):
        return {"accuracy": vqa_accuracy(p, rec["answers"], bench=bench)}
    if bench == "gqa":
        return {"accuracy": float(gqa_match(p, rec["answer"]))}
    if bench == "mmbench":
        choice = mmbench_choice(p, rec["options"])
        return {"choice": choice, "correct": choice == rec["answer"]}
    if bench == "if16":
        verdicts = [
            follows(i, kw, p, prompt=rec["prompt"], loose=loose)
            for loose in (False, True)
            for i, kw in zip(rec["instruction_id_list"], rec["kwargs"], strict=True)
        ]
        n = len(rec["instruction_id_list"])
        return {"strict": verdicts[:n], "loose": verdicts[n:]}
    return {}


def compute_metrics(bench: str, records: list[dict], rows: dict[str, dict]) -> dict[str, Any]:
    """Benchmark metrics over all records; error rows count as wrong and are counted."""
    errors = sum(1 for r in rows.values() if r.get("error"))
    m: dict[str, Any] = {"bench": bench, "num_records": len(records), "num_errors": errors}
    preds = [(rec, rows[rec["id"]]) for rec in records]
    if bench in ("vqav2", "textvqa", "gqa"):
        scores = [score_record(bench, rec, row.get("prediction"))["accuracy"] for rec, row in preds]
        m["accuracy"] = 100.0 * sum(scores) / len(scores)
    elif bench == "mme":
        m.update(mme_scores({**rec, "prediction": row.get("prediction") or ""} for rec, row in preds))
    elif bench == "mmbench":
        results = [(rec["group"], score_record(bench, rec, row.get("prediction"))["correct"]) for rec, row in preds]
        m["circular_accuracy"] = 100.0 * circular_accuracy(results)
        first = [ok for (rec, _), (_, ok) in zip(preds, results, strict=True) if rec["id"].endswith("@0")]
        m["vanilla_accuracy"] = 100.0 * sum(first) / len(first)
    elif bench == "if16":
        strict, loose = [], []
        for rec, row in preds:
            s = score_record(bench, rec, row.get("prediction"))
            base = {"instruction_id_list": rec["instruction_id_list"], "task": rec["task"]}
            strict.append({**base, "follow_instruction_list": s["strict"], "follow_all_instructions": all(s["strict"])})
            loose.append({**base, "follow_instruction_list": s["loose"], "follow_all_instructions": all(s["loose"])})
        m["if16"] = summarize(strict, loose)
        per_task = m["if16"].get("per_task", {})
        if per_task:
            m["if_avg_strict"] = 100.0 * sum(v["strict_rate"] for v in per_task.values()) / len(per_task)
            m["if_avg_loose"] = 100.0 * sum(v["loose_rate"] for v in per_task.values()) / len(per_task)
    return m


HEADLINE = {
    "vqav2": ("accuracy",), "textvqa": ("accuracy",), "gqa": ("accuracy",),
    "mme": ("perception", "cognition"), "mmbench": ("circular_accuracy", "vanilla_accuracy"),
    "if16": ("if_avg_strict", "if_avg_loose"),
}  # fmt: skip


def metrics_markdown(name: str, m: dict) -> str:
    keys = HEADLINE[m["bench"]]
    lines = [f"# {name}: {m['bench']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {m[k]:.2f} |" for k in keys if k in m]
    lines += [f"| records | {m['num_records']} |", f"| errors | {m['num_errors']} |"]
    if m["bench"] == "mme":
        lines += ["", "| category | acc | acc+ | score |", "|---|---|---|---|"]
        lines += [
            f"| {c} | {v['acc']:.1f} | {v['acc_plus']:.1f} | {v['score']:.1f} |" for c, v in m["categories"].items()
        ]
    if m["bench"] == "if16" and "per_task" in m["if16"]:
        lines += ["", "| task | strict | loose |", "|---|---|---|"]
        lines += [
            f"| {t} | {100 * v['strict_rate']:.1f} | {100 * v['loose_rate']:.1f} |"
            for t, v in m["if16"]["per_task"].items()
        ]
    return "\n".join(lines) + "\n"


def read_appended(path: Path) -> list[dict]:
    """The rows of an append-only JSONL file, its torn tail (a killed write leaves at most one partial line at the
    end) cut off the file. Lines split on "\n" only: str.splitlines would also split inside a string holding U+2028,
    U+0085, ... (json.dumps leaves them unescaped with ensure_ascii=False)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    if good < len(data):
        with path.open("r+b") as f:
            f.truncate(good)
    rows = []
    for number, line in enumerate(data[:good].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError as exc:
            row, why = None, str(exc)
        else:
            why = "not a JSON object"
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}, line {number}: {why}; this file is only ever appended to by whole lines, so something else "
                "changed it: delete that line (its record is done again) and rerun the same command."
            )
        rows.append(row)
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` as JSON lines in one fsynced write."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # a full disk, a folder that went read-only, ...: say which file, and that a rerun resumes
        raise OSError(
            exc.errno, f"cannot append to {path} ({exc.strerror}); fix that, then rerun the same command: it resumes"
        ) from exc


class PredictionLog:
    """Append-only ``predictions.jsonl``: one fsynced write per batch, torn tails repaired on open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        rows = read_appended(path)
        if missing := next((i for i, row in enumerate(rows, 1) if "id" not in row), None):
            raise ValueError(f"{path}: row {missing} has no id; delete it and rerun the same command.")
        self.rows: dict[str, dict] = {row["id"]: row for row in rows}

    def append(self, rows: list[dict]) -> None:
        append_rows(self.path, rows)
        for r in rows:
            self.rows[r["id"]] = r


def _one_writer(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Hold the run folder's lock for the whole call, before anything in ``out`` is read: a second identical run
    would otherwise resume from the same state and record every remaining question twice."""

    @functools.wraps(fn)
    def locked(*, out: str | Path, **kwargs: Any) -> dict[str, Any]:
        with RunLock(out, what="unclutter eval"):
            return fn(out=out, **kwargs)

    return locked


@_one_writer
def run_eval(
    *,
    model_name: str,
    method: str,
    bench: str,
    data: str | Path,
    images: str | Path,
    out: str | Path,
    batch_size: int = 8,
    limit: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    max_new_tokens: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    model_and_processor=None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``method`` on a benchmark file; resumes an interrupted run in ``out``. Returns metrics."""
    for name, value in (("batch_size", batch_size), ("limit", limit), ("max_new_tokens", max_new_tokens)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r} (leave limit unset for every record).")
    if model_and_processor is None:  # a device this machine lacks or an unknown dtype stops the run before its folder
        resolved = resolve_device(device)  # is written; both are recorded as what `load_model` will load in, on
        precision, where = str(load_dtype(dtype, resolved)).removeprefix("torch."), torch.device(resolved).type
    if method == "checkpoint" and model_and_processor is None:
        from .generation import load_model

        model_and_processor = load_model(model_name, dtype=dtype, device=device)
    recorded = getattr(model_and_processor[0].config, "unclutter", None) if model_and_processor else None
    configs = resolve(method, overrides, recorded)
    records = load_records(bench, data, images)
    if limit is not None and bench == "mmbench":  # keep whole rotation groups
        groups = {r["group"] for r in records[:limit]}
        records = [r for r in records if r["group"] in groups]
    elif limit is not None:
        records = records[:limit]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model_and_processor is not None:  # what the given (or checkpoint) model computes in, on
        param = next(model_and_processor[0].parameters())
        precision, where = str(param.dtype).removeprefix("torch."), param.device.type
    config = {
        "model": local_or_hub(model_name), "dtype": precision, "device": where, "inputs": _inputs_digest(bench, records),
        "method": method, "overrides": list(overrides), "configs": to_dict(configs),
        "bench": bench, "data": str(Path(data).resolve()), "images": str(Path(images).resolve()), "limit": limit,
        "max_new_tokens": max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(bench, 128), "do_sample": False,
    }  # fmt: skip
    _check_or_write_config(out / "config.json", config)
    log = PredictionLog(out / "predictions.jsonl")
    todo = [r for r in records if r["id"] not in log.rows]

    family = _previous_family(out / "metrics.json")
    if todo or family is None:  # None: killed after its last answer, before metrics.json: the family is looked up
        if model_and_processor is None:
            from .generation import load_model

            model_and_processor = load_model(model_name, dtype=dtype, device=device)
        model, processor = model_and_processor
        patch = {k: v for k, v in configs.items() if v is not None}
        with apply(model, processor, **patch) as handle:
            family = handle.adapter.family
            done = len(records) - len(todo)
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                log.append(_run_batch(bench, method, batch, Path(images), model, processor, config["max_new_tokens"]))
                done += len(batch)
                if progress:
                    progress(done, len(records))
    metrics = compute_metrics(bench, records, log.rows)
    metrics["name"] = out.name
    metrics["model"] = model_name
    metrics["family"] = family
    metrics["method"] = method
    metrics["label"] = " ".join([method, *overrides])  # report rows: one per method + overrides
    write_json_atomic(out / "metrics.json", metrics)
    (out / "metrics.md").write_text(metrics_markdown(out.name, metrics), encoding="utf-8")
    return metrics


def _inputs_digest(bench: str, records: list[dict]) -> str:
    """What the model is asked, per record (id, image, question): the data file regenerated or edited in place under
    the same name must not resume against answers to other questions (corrected answers alone still rescore)."""
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps([rec["id"], str(rec["image"]), question_text(bench, rec)], ensure_ascii=False).encode())
    return h.hexdigest()


def _previous_family(path: Path) -> str | None:
    """The model family an earlier pass of this run recorded (a finished run resumes without loading the model)."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")).get("family")
    return None


def _check_or_write_config(path: Path, config: dict) -> None:
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(old.get("model"), str) and local_or_hub(old["model"]) == config.get("model"):
            old["model"] = config["model"]  # recorded as given before this release: the same folder from here
        # settings recorded only since this release (dtype, device, inputs) are adopted by runs that lack them
        diff = sorted(k for k in set(old) | set(config) if k in old and old.get(k) != config.get(k))
        answers = path.with_name("predictions.jsonl")
        if diff and not (answers.is_file() and answers.stat().st_size):
            write_json_atomic(path, config)  # a first attempt that stopped before its first answer: nothing to mix
            return
        if diff:
            raise ValueError(f"{path.parent} holds a run with different settings ({', '.join(diff)}); use a new --out.")
        if set(config) - set(old):
            write_json_atomic(path, {**config, **old})
    else:
        write_json_atomic(path, config)


def _error_row(rec: dict, error: str) -> dict:
    return {"id": rec["id"], "question_id": rec.get("question_id", rec.get("key")), "prediction": None, "error": error}


def _run_batch(bench, method, batch, images_dir, model, processor, max_new_tokens) -> list[dict]:
    """Predictions for one batch; unreadable images, and images the processor refuses, become error rows (recorded,
    so a rerun does not stop at them again)."""
    rows, good, pictures = [], [], []
    for rec in batch:
        try:
            pictures.append(open_image(images_dir / str(rec["image"])))
            good.append(rec)
        except ValueError as exc:
            rows.append(_error_row(rec, str(exc)))
    while good:
        try:
            rows += _answer(bench, method, good, pictures, model, processor, max_new_tokens)
            break
        except ImagesRefused as exc:  # record those, answer the others
            for i, message in exc.refused.items():
                image = images_dir / str(good[i]["image"])
                rows.append(_error_row(good[i], f"the processor refuses image {image}: {message}"))
            good = [r for i, r in enumerate(good) if i not in exc.refused]
            pictures = [p for i, p in enumerate(pictures) if i not in exc.refused]
    order = {r["id"]: i for i, r in enumerate(batch)}
    return sorted(rows, key=lambda r: order[r["id"]])


def _answer(bench, method, records, pictures, model, processor, max_new_tokens) -> list[dict]:
    """Prediction rows for records and their opened images."""
    questions = [question_text(bench, r) for r in records]
    if method == "describe-then-answer":  # the paper's "upper limit": answer from a description alone
        describe = [build_prompt(processor, DESCRIBE) for _ in records]
        described = generate(model, processor, describe, pictures, max_new_tokens=max_new_tokens)
        prompts = [
            build_prompt(processor, f"Image description: {d}\n\n{q}", with_image=False)
            for d, q in zip(described, questions, strict=True)
        ]
        pictures = None
    else:
        described = [None] * len(records)
        prompts = [build_prompt(processor, q) for q in questions]
    answers = generate(model, processor, prompts, pictures, max_new_tokens=max_new_tokens)
    rows = []
    for rec, answer, desc in zip(records, answers, described, strict=True):
        row = {"id": rec["id"], "question_id": rec.get("question_id", rec.get("key")), "prediction": answer}
        if desc is not None:
            row["description"] = desc
        rows.append(row)
    return rows
