"""Training beyond LLaVA-1.5: families whose processor decides an image's placeholder text (LLaVA-NeXT's anyres).

LLaVA-1.5 sends a fixed count per image, so `LlavaDataset` tokenizes every record up front with ``<image>`` repeated
``handle.num_image_tokens`` times and pads images to a square. An anyres image instead becomes a base tile plus a
grid of high-res tiles chosen from its size, and its token count follows from that grid (under VMTC / SPD: from the
compressed packer's count). `ProcessorImageDataset` therefore asks the family's own processor, per record: its image
processor makes the tiles and ``image_sizes``, and its ``replace_image_token`` (the expansion hook `unclutter.apply`
patches to the compressed count) writes the image's placeholder text, which replaces ``<image>`` in the record's
conversation before tokenizing. Images keep their aspect ratio (anyres handles it; no pad-to-square). Batches pad
the tile axis with zero tiles, as the processor does; the model reads each image's real tile count from
``image_sizes``.

Supported here: LLaVA-NeXT (``LlavaNextForConditionalGeneration``), tested end to end. LLaVA-1.5 keeps its dataset.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from ..ifeval.scoring import DataError
from .data import LlavaDataset, collate, encode_record, load_image

TILED = (LlavaNextForConditionalGeneration,)


def make_dataset(records, model, processor, images_dir, *, fmt, image_tokens, max_length, chat_template=None):
    """The training dataset for ``model``'s family (`LlavaDataset` for LLaVA-1.5, `ProcessorImageDataset` for
    LLaVA-NeXT); ``image_tokens`` is LLaVA-1.5's fixed per-image count (``handle.num_image_tokens``)."""
    if isinstance(model, TILED):
        return ProcessorImageDataset(
            records, processor, images_dir, fmt=fmt, max_length=max_length, chat_template=chat_template
        )
    if isinstance(model, LlavaForConditionalGeneration):
        return LlavaDataset(
            records, processor.tokenizer, processor.image_processor, images_dir,
            fmt=fmt, image_tokens=image_tokens, max_length=max_length, chat_template=chat_template,
        )  # fmt: skip
    raise NotImplementedError(
        f"`unclutter train` trains LLaVA-1.5 and LLaVA-NeXT checkpoints; {type(model).__name__} is not supported yet "
        "(unclutter.apply and `unclutter eval` are)."
    )


def collator(dataset, pad_id: int):
    """The batch function for `make_dataset`'s dataset."""
    if isinstance(dataset, ProcessorImageDataset):
        return lambda batch: collate_tiles(batch, pad_id)
    return lambda batch: collate(batch, pad_id)


LOOSE_FILE = "loose_parameters.safetensors"


def trainable_parameters(model, tune: list[str]) -> dict[str, torch.nn.Parameter]:
    """Parameters that belong to a tuned part but to none of its modules, by their name in ``model`` (its checkpoint
    key): LLaVA-NeXT's ``image_newline`` is trained with the projector (as in the LLaVA-NeXT recipe)."""
    newline = getattr(getattr(model, "model", None), "image_newline", None)
    if "projector" not in tune or not isinstance(newline, torch.nn.Parameter):
        return {}
    return {name: p for name, p in model.named_parameters(remove_duplicate=False) if p is newline}


def save_loose(params: dict[str, torch.nn.Parameter], folder, state_dict: dict | None = None) -> None:
    """Write ``params`` (`trainable_parameters`) to ``folder``/`LOOSE_FILE`. A PEFT checkpoint holds only the adapter
    and ``modules_to_save``, and a bare parameter such as ``image_newline`` is in neither; this file carries it
    beside them. ``state_dict`` (the Trainer's gathered one, under DeepSpeed) is preferred where it holds a value."""
    from safetensors.torch import save_file

    state_dict = state_dict or {}
    tensors = {}
    for name, p in params.items():
        held = next((v for k, v in state_dict.items() if k == name or k.endswith("." + name)), None)
        tensors[name] = (p if held is None else held).detach().cpu().contiguous()
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(folder) / LOOSE_FILE), metadata={"format": "pt"})


def load_loose(params: dict[str, torch.nn.Parameter], folder) -> bool:
    """Copy `save_loose`'s values in ``folder`` into ``params``; False (nothing changed) where it has no such file."""
    from safetensors.torch import load_file

    path = Path(folder) / LOOSE_FILE
    if not path.is_file():
        return False
    saved = load_file(str(path))
    missing = sorted(set(params) - set(saved))
    if missing:
        raise KeyError(f"{path} lacks {missing}; it holds {sorted(saved)}.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    return True


class ProcessorImageDataset(torch.utils.data.Dataset):
    """Records whose image placeholder text comes from the processor; tokenized per item (the text depends on the
    image). Items: ``input_ids``, ``labels`` and, for image records, the image processor's outputs for that image
    (``pixel_values`` (tiles, 3, H, W), ``image_sizes`` (2,))."""

    def __init__(self, records, processor, images_dir, *, fmt: str, max_length: int, chat_template=None) -> None:
        for name in ("image_processor", "replace_image_token", "tokenizer"):
            if not hasattr(processor, name):
                raise TypeError(
                    f"training this family needs its processor (with {name}); got {type(processor).__name__}."
                )
        self.records, self.processor, self.fmt = records, processor, fmt
        self.images_dir = Path(images_dir) if images_dir is not None else None
        self.max_length, self.chat_template = max_length, chat_template
        for i, rec in enumerate(records):  # a record whose image tokens max_length would cut is named before training
            self.check_length(i, rec)

    def check_length(self, i: int, rec: dict) -> None:
        """`encode_record`'s max_length check, run up front: the image's placeholder count follows from its size (read
        from the file's header, no decoding) by the processor's own count (`_get_num_multimodal_tokens`, which
        `unclutter.apply` patches together with ``replace_image_token``). Items are tokenized lazily, so without this
        a record too long for its image would stop the run when first drawn, steps or hours into training."""
        count = 0
        if rec.get("image"):
            if self.images_dir is None:
                return  # `train` refuses image data without --images
            with Image.open(self.images_dir / rec["image"]) as im:
                width, height = im.size
            count = self.processor._get_num_multimodal_tokens(image_sizes=[[height, width]]).num_image_tokens[0]
        try:
            encode_record(rec, self.processor.tokenizer, self.fmt, count, self.max_length, self.chat_template)
        except DataError as exc:
            reason = str(exc).split(": ", 1)[-1]  # encode_record names the record by its id alone
            raise DataError(f"record {i} (id {rec.get('id', '?')}, image {rec.get('image')}): {reason}") from None

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        """Signed text lengths (image tokens not counted): positive for image samples, negative for text-only."""
        tok = self.processor.tokenizer
        out = []
        for rec in self.records:
            n = len(encode_record(rec, tok, self.fmt, 0, 10**9, self.chat_template, image_text="").input_ids)
            out.append(n if rec.get("image") else -n)
        return out

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        pixels, image_text = {}, ""
        if rec.get("image"):
            image = load_image(self.images_dir / rec["image"], f"record {i} (id {rec.get('id', '?')})")
            pixels = self.processor.image_processor(images=[image], return_tensors="pt")
            image_text = self.processor.replace_image_token(pixels, 0) + "\n"
        enc = encode_record(
            rec, self.processor.tokenizer, self.fmt, 0, self.max_length, self.chat_template, image_text=image_text
        )
        out = {"input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels)}
        out.update({key: value[0] for key, value in pixels.items()})
        return out


def collate_tiles(batch: list[dict], pad_id: int) -> dict:
    """`collate`'s right-padded text; each image's tiles, padded with zero tiles to the batch's most, and sizes."""
    out = collate([{k: b[k] for k in ("input_ids", "labels")} for b in batch], pad_id)
    tiles = [b["pixel_values"] for b in batch if "pixel_values" in b]
    if tiles:
        most = max(len(t) for t in tiles)
        padded = torch.zeros(len(tiles), most, *tiles[0].shape[1:], dtype=tiles[0].dtype)
        for j, t in enumerate(tiles):
            padded[j, : len(t)] = t
        out["pixel_values"] = padded
        out["image_sizes"] = torch.stack([b["image_sizes"] for b in batch if "pixel_values" in b])
    return out
