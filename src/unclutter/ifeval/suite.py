"""The paper's 16-task image instruction-following suite (Table 1), built from any image-question set.

Each record is one image question plus one verifiable instruction, in IFEval's input format plus
``image``, ``task`` (T1..T16), ``question_id`` and ``question``. Kwargs are drawn in ranges a short
answer about an image can meet. The same source, seed and tasks always give the same file.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..evaluation.images import to_rgb
from . import describe, resolve_kwargs
from .scoring import DataError, read_jsonl, write_jsonl_atomic

TASKS: dict[str, tuple[str, str]] = {
    "T1": ("punctuation:no_comma", "Remove Commas"),
    "T2": ("change_case:english_lowercase", "Lowercase"),
    "T3": ("change_case:english_capital", "Uppercase"),
    "T4": ("detectable_content:number_placeholders", "Placeholder"),
    "T5": ("detectable_content:postscript", "Postscript"),
    "T6": ("detectable_format:title", "Title"),
    "T7": ("keywords:existence", "Keyword"),
    "T8": ("detectable_format:number_highlighted_sections", "Highlights"),
    "T9": ("detectable_format:json_format", "JSON"),
    "T10": ("detectable_format:multiple_sections", "Sections"),
    "T11": ("detectable_format:number_bullet_lists", "Bullets"),
    "T12": ("length_constraints:number_sentences", "Sentence Count"),
    "T13": ("length_constraints:number_words", "Word Count"),
    "T14": ("combination:two_responses", "Two Responses"),
    "T15": ("startend:end_checker", "End Phrase"),
    "T16": ("startend:start_checker", "Start Phrase"),
}

KEYWORDS = ("image", "color", "scene", "picture", "detail", "visible", "background", "object", "shape", "light")
END_PHRASES = (
    "Is there anything else I can help with?",
    "Let me know if you have additional questions.",
    "That is all.",
)
START_PHRASES = ("My answer is", "Looking at the image,", "In this picture,", "Sure.")
# LLaVA's eval prompts end with answer-format hints that would contradict the instruction.
_FORMAT_HINTS = re.compile(
    r"\s*(Answer the question using a single word or phrase\.|Answer with the option's letter from the given choices directly\.|Please answer yes or no\.)\s*$"
)


def _relation_count(rng: random.Random, less: tuple[int, int], least: tuple[int, int]) -> tuple[str, int]:
    relation = rng.choice(("less than", "at least"))
    lo, hi = less if relation == "less than" else least
    return relation, rng.randint(lo, hi)


def _draw(task: str, rng: random.Random) -> dict[str, Any]:
    """Kwargs for one record of ``task``."""
    if task == "T4":
        return {"num_placeholders": rng.randint(1, 3)}
    if task == "T5":
        return {"postscript_marker": rng.choice(("P.S.", "P.P.S"))}
    if task == "T7":
        return {"keywords": rng.sample(KEYWORDS, rng.randint(1, 2))}
    if task == "T8":
        return {"num_highlights": rng.randint(1, 3)}
    if task == "T10":
        return {"section_spliter": rng.choice(("Section", "SECTION")), "num_sections": rng.randint(2, 3)}
    if task == "T11":
        return {"num_bullets": rng.randint(2, 4)}
    if task == "T12":
        relation, n = _relation_count(rng, (2, 4), (2, 3))
        return {"num_sentences": n, "relation": relation}
    if task == "T13":
        relation, n = _relation_count(rng, (15, 50), (10, 30))
        return {"num_words": n, "relation": relation}
    if task == "T15":
        return {"end_phrase": rng.choice(END_PHRASES)}
    if task == "T16":
        return {"start_phrase": rng.choice(START_PHRASES)}
    return {}


def clean_question(text: str) -> str:
    """Drop ``<image>`` placeholders and LLaVA's answer-format hint from a question."""
    text = text.replace("<image>", " ").strip()
    return re.sub(r"\s+\n", "\n", _FORMAT_HINTS.sub("", text)).strip()


def llava_question_lines(path: str | Path):
    """Yield (line number, record) of a LLaVA question JSONL ``{question_id, image, text}``, each checked."""
    for lineno, obj in read_jsonl(path):
        for field in ("question_id", "image", "text"):
            if field not in obj:
                raise DataError(
                    f"{path}:{lineno}: missing field {field!r} (LLaVA question lines need question_id, image, text)."
                )
        for field in ("image", "text"):
            if not isinstance(obj[field], str):
                raise DataError(f"{path}:{lineno}: {field!r} must be a string, got {obj[field]!r}.")
        yield lineno, obj


def load_llava_questions(path: str | Path, images: str | Path | None = None) -> list[dict]:
    """LLaVA question JSONL ``{question_id, image, text}``; checks images exist when ``images`` is given."""
    rows = []
    for lineno, obj in llava_question_lines(path):
        if images is not None and not (Path(images) / obj["image"]).is_file():
            raise DataError(f"{path}:{lineno}: image {obj['image']!r} not found under {images}.")
        rows.append({"question_id": obj["question_id"], "image": obj["image"], "question": clean_question(obj["text"])})
    if not rows:
        raise DataError(f"{path}: no questions.")
    return rows


def load_hf_questions(
    source: str, out_dir: Path, *, split: str = "test", question_field: str = "question", image_field: str = "image",
    id_field: str = "question_id",
) -> list[dict]:  # fmt: skip
    """A Hugging Face dataset (hub id, or a local dir saved with `save_to_disk`); images saved as PNG."""
    try:
        import datasets
    except ImportError:
        raise ImportError("loading a Hugging Face dataset needs `pip install unclutter[data]`.") from None
    path = Path(source)
    try:
        ds = (
            datasets.load_from_disk(str(path))
            if (path / "dataset_info.json").is_file() or (path / "state.json").is_file()
            else datasets.load_dataset(source, split=split)
        )
    except Exception as exc:  # datasets raises many types (hub, network, file layout): one line that names the source
        raise DataError(f"{source}: cannot load it as a Hugging Face dataset ({type(exc).__name__}: {exc}).") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    missing = [f for f in (question_field, image_field) if f not in ds.column_names]
    if missing:
        raise DataError(f"{source}: the dataset lacks column(s) {missing} (it has {ds.column_names}).")
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ex in enumerate(ds):
        qid = ex.get(id_field, i)
        name = f"{qid}.png"
        if not (image_dir / name).exists():
            to_rgb(ex[image_field]).save(image_dir / name)
        rows.append({"question_id": qid, "image": name, "question": clean_question(str(ex[question_field]))})
    return rows


def build_suite(
    questions: list[dict], *, per_task: int = 218, seed: int = 0, tasks: list[str] | None = None
) -> list[dict]:
    """16 (or ``len(tasks)``) x ``per_task`` records; questions drawn without replacement while they last."""
    tasks = list(TASKS) if tasks is None else tasks
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}.")
    if per_task < 1:
        raise ValueError("per_task must be >= 1.")
    records = []
    for task in tasks:
        instruction_id = TASKS[task][0]
        rng = random.Random(f"unclutter-if16:{seed}:{task}")
        order: list[int] = []
        while len(order) < per_task:  # a fresh permutation each pass: no repeats until all are used
            order += rng.sample(range(len(questions)), len(questions))
        for q_index in order[:per_task]:
            q = questions[q_index]
            kwargs = _draw(task, rng)
            resolve_kwargs(instruction_id, kwargs)  # fails loudly if a draw ever breaks the checker's contract
            records.append(
                {
                    "key": len(records),
                    "prompt": f"{q['question']} {describe(instruction_id, kwargs)}",
                    "instruction_id_list": [instruction_id],
                    "kwargs": [kwargs],
                    "image": q["image"],
                    "task": task,
                    "question_id": q["question_id"],
                    "question": q["question"],
                }
            )
    return records


def build_suite_file(
    source: str | Path,
    out: str | Path,
    *,
    images: str | Path | None = None,
    per_task: int = 218,
    seed: int = 0,
    tasks: list[str] | None = None,
    loader: Callable[..., list[dict]] | None = None,
) -> list[dict]:
    """Build from a LLaVA question JSONL (``.jsonl``) or a Hugging Face dataset and write ``out``."""
    out = Path(out)
    if loader is not None:
        questions = loader(source)
    elif str(source).endswith(".jsonl"):
        questions = load_llava_questions(source, images)
    else:
        _check_dataset_source(str(source))
        questions = load_hf_questions(str(source), out.parent)
    records = build_suite(questions, per_task=per_task, seed=seed, tasks=tasks)
    write_jsonl_atomic(out, records)
    return records


DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet", ".arrow")


def _check_dataset_source(source: str) -> None:
    """A source that is not a .jsonl must be a dataset folder or a hub id: a local file, or a path that does not exist,
    would otherwise reach the hub as an id and fail there with a message about the network."""
    path = Path(source)
    if path.is_file():
        raise DataError(
            f"{source}: a question file must be LLaVA question JSONL ending in .jsonl (or give a dataset saved with "
            "`save_to_disk`, or a Hugging Face dataset id)."
        )
    looks_like_path = (
        source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source or path.suffix in DATA_SUFFIXES
    )  # a hub id is owner/name
    if not path.exists() and looks_like_path:
        raise DataError(f"{source}: no such file or folder.")
