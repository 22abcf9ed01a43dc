"""LLaVA-format training data: validation, the two prompt formats, label masking, pad-to-square.

Records (LLaVA's JSON): ``{"id", "image" (optional: text-only samples have none), "conversations":
[{"from": "human"|"gpt", "value": ...}, ...]}``; the first human turn of an image sample holds
``<image>``. Stage 1 ("plain"): the image tokens then the caption (the first gpt turn), loss on the
caption. Stage 2 (Vicuna v1): ``SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: ...``, loss on the
assistant turns (and their ``</s>``) only. Stage 2 in "chat" format: the processor's chat template (the
one `build_prompt` asks with at inference), loss on each assistant answer through its end-of-turn token.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..evaluation.generation import LLAVA_SYSTEM
from ..evaluation.images import open_image
from ..ifeval.scoring import DataError

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"


def load_llava_json(path: str | Path, images: str | Path | None) -> list[dict]:
    """Read and validate every record before training; errors name the record."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read LLaVA JSON ({exc}).") from None
    if path.suffix == ".jsonl":
        records = []
        # "\n" only: str.splitlines would split a valid line inside a string holding U+2028, U+0085, ...
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or drop the line.") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: cannot read LLaVA JSON ({exc}).") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of records.")
    for i, rec in enumerate(records):
        where = f"{path}: record {i} (id {rec.get('id', '?') if isinstance(rec, dict) else '?'})"
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list) or len(rec["conversations"]) < 2:
            raise DataError(f"{where}: needs 'conversations', a list of at least one human and one gpt turn.")
        for j, turn in enumerate(rec["conversations"]):
            if (
                not isinstance(turn, dict)
                or turn.get("from") not in ("human", "gpt")
                or not isinstance(turn.get("value"), str)
            ):
                raise DataError(f"{where}: turn {j} must be {{'from': 'human'|'gpt', 'value': str}}.")
            if turn["from"] != ("human" if j % 2 == 0 else "gpt"):
                raise DataError(f"{where}: turns must alternate human, gpt, ... (turn {j} is {turn['from']}).")
        n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in rec["conversations"])
        if rec.get("image"):
            if not isinstance(rec["image"], str):
                raise DataError(
                    f"{where}: 'image' must be one file name (a string), got {type(rec['image']).__name__}: "
                    "multi-image records are not supported; split the record or drop it."
                )
            if n_placeholders != 1 or IMAGE_PLACEHOLDER not in rec["conversations"][0]["value"]:
                raise DataError(f"{where}: an image sample needs exactly one '<image>', in the first human turn.")
            if images is not None:
                check_image(Path(images) / rec["image"], where)
        elif n_placeholders:
            raise DataError(f"{where}: has '<image>' but no 'image' field.")
    return records


def check_image(path: Path, where: str) -> None:
    """The image exists and is one Pillow reads, judged from its header (no decoding: a check of every record before
    training stays fast; a file damaged past its header is named when it is loaded, by `load_image`)."""
    if not path.is_file():
        raise DataError(f"{where}: image {path.name!r} not found under {path.parent}.")
    try:
        with Image.open(path) as im:
            mode = im.mode
    except Exception as exc:  # PIL raises many types for files it cannot identify
        raise DataError(f"{where}: cannot read image {path}: {exc}") from None
    if mode in ("I", "F"):
        raise DataError(f"{where}: image {path} has {mode!r} pixels (32-bit); save it as 8- or 16-bit.")


def load_image(path: Path, where: str) -> Image.Image:
    """8-bit RGB (`open_image`), or a `DataError` naming the record and the file."""
    try:
        return open_image(path)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}; fix or drop the record, then rerun") from None


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's preprocessing: paste the image centred on a square of the processor's mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def segments(
    rec: dict, fmt: str, image_text: str, eos: str, chat_template: str | None = None
) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of one record in ``fmt`` ("plain", "v1", or "chat" with ``chat_template``)."""
    turns = rec["conversations"]
    if fmt == "chat":
        return chat_segments(rec, image_text, eos, chat_template)
    if fmt == "plain":
        caption = turns[1]["value"]
        return [(image_text if rec.get("image") else "", False), (caption + "\n", True)]
    pieces: list[tuple[str, bool]] = [(LLAVA_SYSTEM + " ", False)]
    for j in range(0, len(turns) - 1, 2):
        question = _with_image(turns[j]["value"], image_text)
        # The separating space belongs to the answer: inference prompts end in "ASSISTANT:" (see
        # `build_prompt`), so the first answer token must be the space-prefixed one the model saw in training.
        pieces.append((f"USER: {question} ASSISTANT:", False))
        pieces.append((" " + turns[j + 1]["value"] + eos, True))
    return pieces


def _with_image(value: str, image_text: str) -> str:
    """``value`` with its placeholder replaced by ``image_text``: ``<image>\n`` as LLaVA writes it, else ``<image>``
    wherever it stands (``image_text`` ends in its own newline)."""
    placeholder = IMAGE_PLACEHOLDER + "\n" if IMAGE_PLACEHOLDER + "\n" in value else IMAGE_PLACEHOLDER
    return value.replace(placeholder, image_text, 1)


def render_chat(messages: list[dict], chat_template: str, add_generation_prompt: bool = False) -> str:
    """``messages`` through a Jinja chat template, as transformers renders them (no tokenizer needed)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=chat_template, add_generation_prompt=add_generation_prompt
    )
    return rendered[0]


def chat_segments(rec: dict, image_text: str, eos: str, chat_template: str | None) -> list[tuple[str, bool]]:
    """Pieces of ``rec`` rendered by ``chat_template``: the text up to each answer (what the template writes
    with ``add_generation_prompt`` after the question, so training prefixes equal inference prompts), then the
    answer through the first ``eos`` after it (the target: the model learns to stop), then the rest of the
    turn's markup (not a target)."""
    if not chat_template:
        raise ValueError("prompt format 'chat' needs a processor with a chat template.")
    roles = {"human": "user", "gpt": "assistant"}
    messages = [
        {"role": roles[t["from"]], "content": _with_image(t["value"], image_text)} for t in rec["conversations"]
    ]
    if not rec.get("image"):
        messages = [{**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, "")} for m in messages]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for j in range(0, len(messages) - 1, 2):
        prompt = render_chat(messages[: j + 1], chat_template, add_generation_prompt=True)
        full = render_chat(messages[: j + 2], chat_template)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation.")
        reply = full[len(prompt) :]
        answer_end = reply.find(messages[j + 1]["content"]) + len(messages[j + 1]["content"])
        end = reply.find(eos, answer_end) if eos else -1
        cut = len(reply) if end < 0 else end + len(eos)
        pieces += [(prompt[len(done) :], False), (reply[:cut], True), (reply[cut:], False)]
        done = full
    return pieces


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    image: str | None


def encode_record(
    rec: dict,
    tokenizer,
    fmt: str,
    image_tokens: int,
    max_length: int,
    chat_template: str | None = None,
    image_text: str | None = None,
) -> Encoded:
    """Token ids with labels masked to the target pieces; the image placeholder expanded to ``image_tokens``
    (or replaced by ``image_text``, the processor's own expansion for families whose count depends on the image).

    Pieces are tokenized separately so a label boundary never splits a token. Sequences longer than
    ``max_length`` are cut at the end (never inside the image tokens: such a record is an error). The "chat"
    format starts with whatever the template writes first (no BOS added: inference adds none either).
    """
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if image_text is None or not rec.get("image"):
        image_text = IMAGE_PLACEHOLDER * image_tokens + "\n" if rec.get("image") else ""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and fmt != "chat" else []
    labels = [IGNORE_INDEX] * len(ids)
    for text, target in segments(rec, fmt, image_text, tokenizer.eos_token or "", chat_template):
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
    if len(ids) > max_length:
        if sum(1 for t in ids[:max_length] if t == image_token) != sum(1 for t in ids if t == image_token):
            raise DataError(
                f"record {rec.get('id')}: max_length {max_length} would cut its image tokens; raise --max-length "
                "(YAML max_length) or drop the record."
            )
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels, rec.get("image"))


class LlavaDataset(torch.utils.data.Dataset):
    """Tokenized records; images are loaded, padded to square and processed lazily per item."""

    def __init__(
        self, records, tokenizer, image_processor, images_dir, *, fmt, image_tokens, max_length, chat_template=None
    ):
        self.items = [encode_record(r, tokenizer, fmt, image_tokens, max_length, chat_template) for r in records]
        self.image_processor = image_processor
        self.images_dir = Path(images_dir) if images_dir is not None else None
        mean = getattr(image_processor, "image_mean", [0.5, 0.5, 0.5])
        self.fill = tuple(int(round(255 * m)) for m in mean)

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        """Signed lengths: positive for image samples, negative for text-only (LLaVA's modality lengths)."""
        return [len(it.input_ids) if it.image else -len(it.input_ids) for it in self.items]

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        out = {"input_ids": torch.tensor(it.input_ids), "labels": torch.tensor(it.labels)}
        if it.image:
            image = pad_to_square(load_image(self.images_dir / it.image, f"record {i}"), self.fill)
            out["pixel_values"] = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return out


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-padded batch; ``pixel_values`` only for the samples that have an image, in order."""
    longest = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = b["input_ids"], b["labels"], 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pixels = [b["pixel_values"] for b in batch if "pixel_values" in b]
    if pixels:
        out["pixel_values"] = torch.stack(pixels)
    return out


def modality_length_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """LLaVA's modality-length grouping: batches hold one modality and similar lengths, batch order random.

    Incomplete batches go last (so they cannot shift the alignment of full ones) and may mix.
    """
    rng = random.Random(seed)
    batches, leftovers = [], []
    for sign in (1, -1):
        idx = [i for i, n in enumerate(lengths) if (n > 0) == (sign > 0)]
        rng.shuffle(idx)
        mega = batch_size * 50
        for s in range(0, len(idx), mega):
            chunk = sorted(idx[s : s + mega], key=lambda i: -abs(lengths[i]))
            for k in range(0, len(chunk), batch_size):
                (batches if len(chunk[k : k + batch_size]) == batch_size else leftovers).append(
                    chunk[k : k + batch_size]
                )
    rng.shuffle(batches)
    return [i for b in batches + leftovers for i in b]
