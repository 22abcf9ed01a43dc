"""The shapes model's starting point: a byte-level BPE tokenizer trained on the world's text, a CLIP ViT
pretrained from scratch on the world's ground truth, and a random-init LLaMA; `unclutter train --vision
--llm` assembles them into a LLaVA.

Why a vision pretraining step: LLaVA's recipe starts from a pretrained CLIP tower. Ours can't be downloaded,
and learning shapes from scratch through the language-model loss is slow: with every module trained, 1,000
caption steps named 59% of the objects right. Per-patch classifiers on the tower's features
(`pretrain_vision`, ~3 minutes) bring stage-1 captions to 94%: the part CLIP's pretraining plays for LLaVA.

Sizes (``SIZES``) are chosen for CPU training in minutes: a 96x96 image in 8x8 patches (12x12 = 144
patch tokens, so VMTC has redundancy to remove), a 5-block ViT (LLaVA reads block 4, `vision_feature_layer=-2`)
and a 4-layer LLaMA.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from ..evaluation.runner import SHORT_ANSWER
from ..ifeval.scoring import read_jsonl
from ..ifeval.suite import END_PHRASES, KEYWORDS, START_PHRASES
from .world import COLORS, IMAGE_SIZE, POSITIONS, SHAPES

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
SIZES = {
    "patch_size": 8,
    "vision_hidden": 128,
    "vision_layers": 5,
    "vision_heads": 4,
    "text_hidden": 256,
    "text_layers": 4,
    "text_heads": 4,
    "vocab_size": 1024,
}


def world_texts(data_dir: str | Path) -> Iterable[str]:
    """Every string the model will read or write, cut into the pieces training tokenizes one by one.

    Training tokenizes a record piece by piece (`training.data.segments`: the system prompt, each
    "USER: ... ASSISTANT:", each answer), so the BPE learns merges only inside pieces. Trained on joined
    text it learns merges across piece boundaries ("ĠUSER"), which training never produces but a prompt
    tokenized whole at inference does: every inference prompt then differs from its training prefix.
    """
    from ..training.data import segments

    data_dir = Path(data_dir)
    yield from (SHORT_ANSWER, *KEYWORDS, *END_PHRASES, *START_PHRASES)
    for name, fmt in (("pretrain.json", "plain"), ("finetune.json", "v1")):
        for rec in json.loads((data_dir / name).read_text(encoding="utf-8")):
            yield from (text for text, _ in segments(rec, fmt, "", "") if text)
    for line in (data_dir / "if16.jsonl").read_text(encoding="utf-8").splitlines():
        yield f"USER: {json.loads(line)['prompt']} ASSISTANT:"


def add_bos(backend) -> None:
    """Prepend ``<s>`` on encode, as LLaMA tokenizers do (training adds it itself; inference relies on this)."""
    from tokenizers import processors

    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = SIZES["vocab_size"]):
    """Byte-level BPE (exact round trip of any text, so formats like JSON and ``<<title>>`` survive)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(texts, trainer=trainer)
    add_bos(backend)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) 2D sin-cos position codes, row-major, unit RMS."""
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    parts = [f(c.reshape(-1, 1) * freq) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1) * (2**0.5)


def write_init(data_dir: str | Path, out: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Random-init ``out/vision`` (CLIP ViT + image processor) and ``out/llm`` (LLaMA + tokenizer)."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tok = train_tokenizer(world_texts(data_dir))
    torch.manual_seed(seed)
    s = SIZES
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=IMAGE_SIZE, patch_size=s["patch_size"], hidden_size=s["vision_hidden"],
            intermediate_size=4 * s["vision_hidden"], num_hidden_layers=s["vision_layers"],
            num_attention_heads=s["vision_heads"], projection_dim=s["vision_hidden"],
        )
    )  # fmt: skip
    with torch.no_grad():  # a fixed 2D sin-cos init (as in MAE) makes "where" learnable in minutes
        pos = vision.embeddings.position_embedding.weight
        pos[1:] = sincos_2d(IMAGE_SIZE // s["patch_size"], s["vision_hidden"]) * pos[1:].std() * 10
        pos[0] = 0
    vision.save_pretrained(out / "vision", safe_serialization=True)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(out / "vision")
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=s["text_hidden"], intermediate_size=int(2.75 * s["text_hidden"]),
            num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
            num_key_value_heads=s["text_heads"], max_position_embeddings=1024, tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
    )  # fmt: skip
    llm.save_pretrained(out / "llm", safe_serialization=True)
    tok.save_pretrained(out / "llm")
    return out / "vision", out / "llm"


CELLS = len(POSITIONS)  # the world's grid is CELLS x CELLS


def cell_of_patch(grid: int) -> torch.Tensor:
    """(grid*grid,) the world's grid cell (row-major) that each patch of a grid x grid ViT (row-major) lies in."""
    rows, cols = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    return (rows * CELLS // grid) * CELLS + cols * CELLS // grid


def _cell_labels(scene: dict) -> tuple[list[int], list[int]]:
    """Per grid cell (row-major): shape and colour class, 0 = empty cell."""
    shapes, colors = [0] * CELLS * CELLS, [0] * CELLS * CELLS
    for o in scene["objects"]:
        cell = o["row"] * CELLS + o["col"]
        shapes[cell], colors[cell] = 1 + SHAPES.index(o["shape"]), 1 + list(COLORS).index(o["color"])
    return shapes, colors


def pretrain_vision(
    data_dir: str | Path, vision_dir: str | Path, out: str | Path, *,
    steps: int = 600, batch_size: int = 32, lr: float = 1e-3, holdout: int = 500, seed: int = 0,
    shape_weight: float = 2.0,
) -> dict:  # fmt: skip
    """Train the ViT so that every patch token says where it is and what its grid cell holds.

    Three linear heads read each patch token at ``hidden_states[-2]`` (what LLaVA reads,
    ``vision_feature_layer=-2``) and classify its cell, the cell's shape and the cell's colour (empty
    is a class); they are thrown away afterwards. Cell-level labels on every patch make a cell's tokens
    agree, so the LLM can count by attention mass and find an object from any of its tokens. The last
    ``holdout`` scenes are held out for the per-patch accuracies written to ``out/vision_pretrain.json``,
    which is also returned. ``shape_weight`` scales the shape loss. Shape is the harder label (a cell's
    background corners must learn it from their neighbours): at weight 1 and 400 steps it reached 92.7% of
    occupied patches and 31% of their feature variance (colour 99.9% and 39%); at 2 and 600 steps (as
    shipped), 99.1% and 50% (colour 100% and 29%). At 3 (model card, run K) colour fell to 18% of the
    variance and the trained LLM found objects by colour badly.
    """
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPVisionModel

    data_dir, out = Path(data_dir), Path(out)
    scenes = [scene for _, scene in read_jsonl(data_dir / "scenes.jsonl")]
    if len(scenes) <= holdout:
        raise ValueError(f"{data_dir}: {len(scenes)} scenes; need more than the {holdout} held out.")
    processor = AutoImageProcessor.from_pretrained(vision_dir)
    images = [Image.open(data_dir / "images" / s["image"]).convert("RGB") for s in scenes]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    torch.manual_seed(seed)
    tower = CLIPVisionModel.from_pretrained(vision_dir, use_safetensors=True)
    grid = tower.config.image_size // tower.config.patch_size
    cells = cell_of_patch(grid)  # (P,)
    per_cell = torch.tensor([_cell_labels(s) for s in scenes])  # (N, 2, CELLS*CELLS)
    labels = torch.cat([per_cell[:, :, cells], cells.expand(len(scenes), 1, -1)], dim=1)  # (N, 3, P)
    names = ("shape", "color", "cell")
    heads = torch.nn.ModuleList(
        [torch.nn.Linear(tower.config.hidden_size, n) for n in (1 + len(SHAPES), 1 + len(COLORS), CELLS * CELLS)]
    )

    def logits(x: torch.Tensor) -> list[torch.Tensor]:
        h = tower(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]  # (B, P, D)
        return [head(h) for head in heads]  # each (B, P, classes)

    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min((t + 1) / warmup, 0.5 * (1 + math.cos(math.pi * t / steps)))
    )
    train_n, log = len(scenes) - holdout, []
    tower.train()
    for step in range(steps):
        idx = torch.randint(0, train_n, (batch_size,))
        loss = sum(
            weight * torch.nn.functional.cross_entropy(lg.flatten(0, 1), labels[idx, k].flatten())
            for k, (lg, weight) in enumerate(zip(logits(pixels[idx]), (shape_weight, 1.0, 1.0), strict=True))
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 8) == 0:
            log.append({"step": step + 1, "loss": round(loss.item(), 4)})
    tower.eval()
    with torch.no_grad():
        preds = [logits(pixels[i : i + 64]) for i in range(train_n, len(scenes), 64)]
    result = {"steps": steps, "batch_size": batch_size, "lr": lr, "shape_weight": shape_weight, "log": log}
    occupied = labels[train_n:, 0] > 0
    for k, name in enumerate(names):
        right = torch.cat([p[k].argmax(-1) for p in preds]) == labels[train_n:, k]
        if name == "cell":
            result["heldout_cell_acc"] = round(right.float().mean().item(), 4)
        else:  # patches of occupied cells, and of empty cells
            result[f"heldout_{name}_acc"] = round(right[occupied].float().mean().item(), 4)
            result[f"heldout_{name}_empty_acc"] = round(right[~occupied].float().mean().item(), 4)
    tower.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "vision_pretrain.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def ship(checkpoint: str | Path, dest: str | Path | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Copy a trained checkpoint into the package (half-precision safetensors + processor files).

    fp16 halves the size; `load_model` casts back to float32 on CPU.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dest = Path(dest) if dest is not None else Path(__file__).parent / "weights"
    dest.mkdir(parents=True, exist_ok=True)
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, use_safetensors=True, dtype=dtype)
    model.save_pretrained(dest, safe_serialization=True)
    AutoProcessor.from_pretrained(checkpoint).save_pretrained(dest)
    log = Path(checkpoint) / "train_log.json"
    if log.is_file():
        (dest / "stage2_train_log.json").write_text(log.read_text(encoding="utf-8"), encoding="utf-8")
    return dest


def main(argv: list[str] | None = None) -> None:
    """``python -m unclutter.shapes.model init DATA OUT`` | ``vision DATA INIT_VISION OUT`` | ``ship CKPT [DEST]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m unclutter.shapes.model")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init", help="tokenizer + random-init ViT and LLaMA")
    p.add_argument("data_dir")
    p.add_argument("out_dir")
    p = sub.add_parser("vision", help="pretrain the ViT on the world's ground truth")
    p.add_argument("data_dir")
    p.add_argument("init_vision_dir")
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (batch 32)")
    p.add_argument("--shape-weight", type=float, default=2.0, help="weight of the shape loss (2 as shipped)")
    p = sub.add_parser("ship", help="copy a checkpoint into the package (fp16 safetensors)")
    p.add_argument("checkpoint")
    p.add_argument("dest", nargs="?")
    args = parser.parse_args(argv)
    if args.cmd == "init":
        print(*write_init(args.data_dir, args.out_dir))
    elif args.cmd == "vision":
        result = pretrain_vision(
            args.data_dir, args.init_vision_dir, args.out_dir, steps=args.steps, shape_weight=args.shape_weight
        )
        print(json.dumps(result))
    else:
        print(ship(args.checkpoint, args.dest))


if __name__ == "__main__":
    main()
