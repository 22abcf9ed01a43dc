"""One JSONL record format per benchmark, validation before a run, and converters.

Every record has ``question_id``, ``image`` (a path relative to the image folder) and the fields of
its benchmark:

| bench | fields |
|---|---|
| vqav2, textvqa | ``question``, ``answers`` (the 10 human answers) |
| gqa | ``question``, ``answer`` |
| mme | ``question``, ``answer`` (Yes/No), ``category``; ``question_id`` is the image id (2 questions each) |
| mmbench | ``question``, ``options`` ({"A": ..., ...}), ``answer`` (letter), optional ``hint``, ``category`` |
| if16 | the suite of `unclutter ifeval build`: ``key``, ``prompt``, ``instruction_id_list``, ``kwargs``, ``task`` |

Each loaded record also gets a unique ``id`` (the run's resume key): the ``id`` field if present,
else ``question_id`` (``key`` for if16), with ``#n`` added for MME's repeated image ids. MMBench
records are expanded into one copy per option rotation (``id@r``) for CircularEval.
"""

from __future__ import annotations

import base64
import csv
import io
from collections import Counter
from pathlib import Path

from ..ifeval.scoring import DataError, check_instructions, read_json_object, read_jsonl, write_jsonl_atomic
from ..ifeval.suite import llava_question_lines
from ..metrics import MME_COGNITION, MME_PERCEPTION, rotate_options
from .images import to_rgb

BENCHES = ("vqav2", "textvqa", "gqa", "mme", "mmbench", "if16")
REQUIRED = {
    "vqav2": ("question_id", "image", "question", "answers"),
    "textvqa": ("question_id", "image", "question", "answers"),
    "gqa": ("question_id", "image", "question", "answer"),
    "mme": ("question_id", "image", "question", "answer", "category"),
    "mmbench": ("question_id", "image", "question", "options", "answer"),
    "if16": ("key", "image", "prompt", "instruction_id_list", "kwargs", "task"),  # task: the per-task rates
}


def check_bench(bench: str) -> None:
    if bench not in BENCHES:
        raise ValueError(f"unknown benchmark {bench!r}; choose from {', '.join(BENCHES)}.")


def load_records(bench: str, path: str | Path, images: str | Path | None) -> list[dict]:
    """Read and validate a benchmark file; every problem names the file, the line and the field."""
    check_bench(bench)
    records, seen = [], Counter()
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        missing = [f for f in REQUIRED[bench] if f not in rec or rec[f] is None]
        if missing:
            raise DataError(f"{where}: {bench} record lacks {missing} (needs {list(REQUIRED[bench])}).")
        _check_fields(bench, rec, where)
        if images is not None and not (Path(images) / str(rec["image"])).is_file():
            raise DataError(f"{where}: image {rec['image']!r} not found under {images}.")
        base = str(rec.get("id", rec["key"] if bench == "if16" else rec["question_id"]))
        seen[base] += 1
        rec["id"] = base if bench != "mme" else f"{base}#{seen[base] - 1}"
        if seen[base] > 1 and bench != "mme":
            raise DataError(f"{where}: duplicate id {base!r}; ids must be unique (give an 'id' field).")
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no records.")
    return expand_circular(records) if bench == "mmbench" else records


def _check_fields(bench: str, rec: dict, where: str) -> None:
    """Field types and values, so that a malformed record stops the run before it starts (not after generating)."""
    if bench in ("vqav2", "textvqa"):
        answers = rec["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(
                f"{where}: 'answers' must be a non-empty list of strings (the human answers; official VQA files hold "
                "{'answer': ...} objects: convert them with `unclutter data convert`)."
            )
    elif bench in ("gqa", "mme", "mmbench") and not isinstance(rec["answer"], str):
        raise DataError(f"{where}: 'answer' must be a string, got {rec['answer']!r}.")
    if not isinstance(rec.get("question", rec.get("prompt")), str):
        raise DataError(f"{where}: the question must be a string.")
    if bench == "mme" and rec["answer"].lower().strip().replace(".", "") not in ("yes", "no"):  # as `mme_scores`
        raise DataError(f"{where}: MME answers are Yes or No, got {rec['answer']!r}.")
    if bench == "mme" and rec["category"] not in MME_PERCEPTION + MME_COGNITION:  # else scored as cognition
        raise DataError(
            f"{where}: unknown MME category {rec['category']!r}; MME's are {', '.join(MME_PERCEPTION + MME_COGNITION)}."
        )
    if bench == "mmbench":
        options = rec["options"]
        if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
            raise DataError(f"{where}: 'options' must map letters to texts.")
        if not str(options.get(rec["answer"], "")).strip():
            raise DataError(f"{where}: the answer letter {rec['answer']!r} names no option with a text.")
    if bench == "if16":
        if not isinstance(rec["task"], str):
            raise DataError(f"{where}: 'task' must be a string (T1..T16), got {rec['task']!r}.")
        check_instructions(where, rec["instruction_id_list"], rec["kwargs"], rec["prompt"])


def expand_circular(records: list[dict]) -> list[dict]:
    """One copy of each MMBench question per rotation of its options (CircularEval)."""
    out = []
    for rec in records:
        n = sum(1 for v in rec["options"].values() if v is not None and str(v).strip())
        for shift in range(n):
            options, answer = rotate_options(rec["options"], rec["answer"], shift)
            out.append({**rec, "options": options, "answer": answer, "group": rec["id"], "id": f"{rec['id']}@{shift}"})
    return out


# ---- converters -------------------------------------------------------------------------------


def _llava_questions(path: str | Path) -> list[dict]:
    rows = []
    for _, obj in llava_question_lines(path):
        question = obj["text"].split("\n")[0].replace("<image>", "").strip()  # drop LLaVA's format hint
        rows.append(
            {
                "question_id": obj["question_id"],
                "image": obj["image"],
                "question": question,
                **({"category": obj["category"]} if "category" in obj else {}),
            }
        )
    return rows


ANSWER_FILES = {  # the official answers file each LLaVA question set is converted with
    "vqav2": "v2_mscoco_val2014_annotations.json", "textvqa": "TextVQA_0.5.1_val.json",
    "gqa": "testdev_balanced_questions.json",
}  # fmt: skip


def convert_llava(bench: str, questions: str | Path, annotations: str | Path, out: str | Path) -> int:
    """LLaVA eval question JSONL + the official answers file -> our format. Returns the record count.

    vqav2: ``v2_mscoco_val2014_annotations.json``; textvqa: ``TextVQA_0.5.1_val.json``;
    gqa: ``testdev_balanced_questions.json``.
    """
    if bench not in ANSWER_FILES:
        raise ValueError(
            f"convert_llava handles vqav2, textvqa and gqa; use convert_mme / convert_mmbench_tsv for {bench}."
        )
    _check_input(annotations)
    data = read_json_object(annotations, f"the {bench} answers file, {ANSWER_FILES[bench]}")
    try:
        if bench == "vqav2":
            answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in data["annotations"]}
        elif bench == "textvqa":
            answers = {a["question_id"]: a["answers"] for a in data["data"]}
        else:
            answers = {qid: v["answer"] for qid, v in data.items()}
    except (KeyError, TypeError) as exc:  # another benchmark's file (or another layout)
        lacks = f"lacks field {exc.args[0]!r}" if isinstance(exc, KeyError) else f"is not laid out as {bench}'s"
        raise DataError(f"{annotations} {lacks} (is it the {bench} answers file, {ANSWER_FILES[bench]}?).") from None
    key = "answers" if bench in ("vqav2", "textvqa") else "answer"
    rows = []
    for q in _llava_questions(questions):
        qid = q["question_id"]
        ans = answers.get(qid, answers.get(str(qid)))
        if ans is None:
            raise DataError(f"{annotations}: no answer for question_id {qid!r}.")
        rows.append({**q, key: ans})
    return _write(rows, out, questions)


def convert_mme(root: str | Path, out: str | Path) -> int:
    """The official MME release folder (one folder per category; ``question<TAB>answer`` .txt files beside
    or in ``questions_answers_YN/``, images beside or in ``images/``) -> our format, image paths relative to ``root``."""
    root = Path(root)
    _check_input(root, folder=True)
    rows = []
    for cat_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = cat_dir / "questions_answers_YN" if (cat_dir / "questions_answers_YN").is_dir() else cat_dir
        img_dir = cat_dir / "images" if (cat_dir / "images").is_dir() else cat_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            image = next(
                (p for p in img_dir.glob(txt.stem + ".*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")), None
            )
            if image is None:
                raise DataError(f"{txt}: no image named {txt.stem}.* in {img_dir}.")
            for lineno, line in enumerate(_read_text(txt).split("\n"), 1):
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise DataError(f"{txt}:{lineno}: expected 'question<TAB>answer'.")
                question, answer = line.rsplit("\t", 1)
                rows.append({
                    "question_id": f"{cat_dir.name}/{image.name}", "image": str(image.relative_to(root)),
                    "question": question.strip(), "answer": answer.strip(), "category": cat_dir.name,
                })  # fmt: skip
    return _write(rows, out, root)


def convert_mmbench_tsv(tsv: str | Path, out: str | Path, images_out: str | Path) -> int:
    """MMBench's TSV (index, question, hint, A-D, answer, category, base64 image) -> our format + image files."""
    _check_input(tsv)
    images_out = Path(images_out)
    rows = []
    with open(tsv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in ("index", "question", "image") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{tsv} lacks column(s) {missing} (is it the MMBench TSV?).")
        images_out.mkdir(parents=True, exist_ok=True)
        for lineno, row in enumerate(reader, 2):
            if _circular_copy(row.get("index"), f"{tsv}:{lineno}"):
                continue
            try:
                raw = base64.b64decode(row["image"])
                name = f"{row['index']}.png"
                _save_image_bytes(raw, images_out / name)
            except Exception as exc:
                raise DataError(f"{tsv}:{lineno}: bad image ({exc}).") from None
            options = {k: row[k] for k in "ABCDEFGH" if row.get(k) and str(row[k]).strip() and str(row[k]) != "nan"}
            hint = row.get("hint")
            rows.append({
                "question_id": row["index"], "image": name, "question": row["question"], "options": options,
                "answer": row.get("answer"), "category": row.get("category"),
                **({"hint": hint} if hint and hint != "nan" else {}),
            })  # fmt: skip
    return _write(rows, out, tsv)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it as UTF-8."
        ) from None


def _check_input(path: str | Path, folder: bool = False) -> None:
    if not (Path(path).is_dir() if folder else Path(path).is_file()):
        raise DataError(f"{path}: no such {'folder' if folder else 'file'}.")


def _write(rows: list[dict], out: str | Path, source) -> int:
    """Write the converted records; none at all means the source was not what the converter reads."""
    if not rows:
        raise DataError(f"{source}: no records found to convert (is it the right file or folder?); nothing written.")
    write_jsonl_atomic(Path(out), rows)
    return len(rows)


# MMBench's releases carry each question's circular copies (options rotated) as rows ``index + k * 1e6``; lmms-eval
# scores the main rows (index < 1e6) and gathers the copies by ``index % 1e6``. Our loader makes the rotations itself
# (`expand_circular`), so the converters keep the main rows only: kept, every copy would be rotated again and weigh
# its question once more.
CIRCULAR_OFFSET = 1_000_000


def _circular_copy(index, where: str) -> bool:
    """Whether an MMBench release row is a circular copy of another (its index is at least 1e6)."""
    try:
        return int(float(index)) >= CIRCULAR_OFFSET
    except (TypeError, ValueError):
        raise DataError(f"{where}: MMBench row without a numeric 'index' ({index!r}).") from None


def _save_image_bytes(raw: bytes, path: Path) -> None:
    from PIL import Image

    to_rgb(Image.open(io.BytesIO(raw))).save(path)


# lmms-lab datasets on the Hugging Face hub: field names per benchmark.
HF_FIELDS = {
    "vqav2": {"question_id": "question_id", "question": "question", "answers": "answers"},
    "textvqa": {"question_id": "question_id", "question": "question", "answers": "answers"},
    "gqa": {"question_id": "id", "question": "question", "answer": "answer"},
    "mme": {"question_id": "question_id", "question": "question", "answer": "answer", "category": "category"},
    "mmbench": {
        "question_id": "index",
        "question": "question",
        "answer": "answer",
        "category": "category",
        "hint": "hint",
    },
}


def convert_hf(
    bench: str, dataset, out: str | Path, images_out: str | Path, *, split: str | None = None, image_dataset=None
) -> int:
    """An lmms-lab style dataset (a `datasets.Dataset`, a hub id or a `save_to_disk` dir) -> our format.

    GQA keeps images in a separate config: pass it as ``image_dataset`` (rows with ``id`` and ``image``).
    """
    ds = _open_dataset(dataset, split)
    fields = HF_FIELDS.get(bench)
    if fields is None:
        raise ValueError(f"convert_hf handles {', '.join(HF_FIELDS)}; build if16 with `unclutter ifeval build`.")
    images_out = Path(images_out)
    images_out.mkdir(parents=True, exist_ok=True)
    image_lookup = (
        {str(r["id"]): r["image"] for r in _open_dataset(image_dataset, split)} if image_dataset is not None else None
    )
    rows = []
    for i, ex in enumerate(ds):
        if bench == "mmbench" and _circular_copy(ex.get("index"), f"dataset row {i}"):
            continue
        rec = {ours: ex.get(theirs) for ours, theirs in fields.items() if ex.get(theirs) is not None}
        if bench == "vqav2":
            rec["answers"] = [a["answer"] if isinstance(a, dict) else a for a in rec["answers"]]
        if bench == "mmbench":
            rec["options"] = {k: ex[k] for k in "ABCDEFGH" if ex.get(k) and str(ex[k]).strip() and str(ex[k]) != "nan"}
        image = ex.get("image") if image_lookup is None else image_lookup.get(str(ex.get("imageId")))
        if image is None:
            raise DataError(f"dataset row {i}: no image (for GQA pass the images config as image_dataset).")
        name = f"{i:07d}.png"
        to_rgb(image).save(images_out / name)
        rows.append({**rec, "image": name})
    return _write(rows, out, dataset if isinstance(dataset, str | Path) else "the dataset")


def _open_dataset(dataset, split):
    try:
        import datasets
    except ImportError:
        raise ImportError("converting a Hugging Face dataset needs `pip install unclutter[data]`.") from None
    if isinstance(dataset, datasets.Dataset | datasets.DatasetDict):
        ds = dataset
    elif Path(str(dataset)).is_dir():
        ds = datasets.load_from_disk(str(dataset))
    else:
        ds = datasets.load_dataset(str(dataset), split=split)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split or next(iter(ds))]
    return ds
