"""The shapes world's CLIP-style ViT: pretrained from scratch on the world's ground truth, the part CLIP's
pretraining plays for LLaVA (a real CLIP tower cannot be downloaded here).

Two objectives, read where a LLaVA reads them:

- every patch token of block ``-2`` (what LLaVA feeds its projector, ``vision_feature_layer=-2``) names its
  3x3-grid cell and that cell's shape and colour (empty is a class), so the LLM can find, name and count
  objects from the patch tokens;
- the CLS token of the last block (CLIP's image embedding: ``pooler_output``) summarises the scene: which of
  the 30 (colour, shape) objects are present (multi-label) and how many objects there are. CLIP's CLS is
  trained to summarise the image too, and that is what makes its attention a ranking of informative
  patches, the ranking VMTC keeps tokens by. Without a CLS objective the CLS token has no training signal
  at all and its attention says nothing about the scene.

`cls_attention_ratio` measures the second point: per block, the share of the CLS token's attention that
lands on object pixels against the share of the image the objects cover.

``python -m unclutter.shapes.vision pretrain DATA OUT`` | ``attention DATA TOWER``
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..ifeval.scoring import read_jsonl, write_json_atomic
from .world import COLORS, IMAGE_SIZE, POSITIONS, SHAPES

VIT = {"patch_size": 8, "hidden_size": 128, "num_hidden_layers": 5, "num_attention_heads": 4}
CELLS = len(POSITIONS)  # the world's grid is CELLS x CELLS
PAIRS = [(c, s) for c in COLORS for s in SHAPES]  # the 30 objects the CLS token reports


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) 2D sin-cos position codes, row-major, unit RMS."""
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    parts = [f(c.reshape(-1, 1) * freq) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1) * (2**0.5)


def init_tower(seed: int = 0):
    """(random-init CLIPVisionModel, its image processor): 96x96 input, 8x8 patches (144 patch tokens), 5 blocks."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    h = VIT["hidden_size"]
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=IMAGE_SIZE, intermediate_size=4 * h, projection_dim=h, **VIT))
    with torch.no_grad():  # a fixed 2D sin-cos init (as in MAE) makes "where" learnable in minutes
        pos = tower.embeddings.position_embedding.weight
        pos[1:] = sincos_2d(IMAGE_SIZE // VIT["patch_size"], h) * pos[1:].std() * 10
        pos[0] = 0
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return tower, processor


def cell_of_patch(grid: int) -> torch.Tensor:
    """(grid*grid,) the world's grid cell (row-major) that each patch of a grid x grid ViT (row-major) lies in."""
    rows, cols = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    return (rows * CELLS // grid) * CELLS + cols * CELLS // grid


def cell_labels(scene: dict) -> tuple[list[int], list[int]]:
    """Per grid cell (row-major): shape and colour class, 0 = empty cell."""
    shapes, colors = [0] * CELLS * CELLS, [0] * CELLS * CELLS
    for o in scene["objects"]:
        cell = o["row"] * CELLS + o["col"]
        shapes[cell], colors[cell] = 1 + SHAPES.index(o["shape"]), 1 + list(COLORS).index(o["color"])
    return shapes, colors


def scene_labels(scene: dict) -> tuple[list[float], int]:
    """(presence of each of the 30 (colour, shape) objects, object count - 1): the CLS token's targets."""
    present = {(o["color"], o["shape"]) for o in scene["objects"]}
    return [float(p in present) for p in PAIRS], len(scene["objects"]) - 1


def _scene_from_dict(scene: dict):
    from .world import Obj, Scene

    keys = ("shape", "color", "row", "col", "cx", "cy", "radius")
    return Scene(tuple(Obj(**{k: o[k] for k in keys}) for o in scene["objects"]), scene["seed"])


def patch_coverage(scenes: list[dict], patch_size: int) -> torch.Tensor:
    """(N, P) the share of each patch's pixels that the scene's shapes cover (row-major patches)."""
    from .world import object_coverage

    cover = torch.from_numpy(np.stack([object_coverage(_scene_from_dict(s)) for s in scenes]))
    return F.avg_pool2d(cover[:, None], patch_size).flatten(1)


def _load_pixels(data_dir: Path, scenes: list[dict], processor) -> torch.Tensor:
    from PIL import Image

    images = [Image.open(data_dir / "images" / s["image"]).convert("RGB") for s in scenes]
    return processor(images=images, return_tensors="pt")["pixel_values"]


class Heads(torch.nn.Module):
    """Linear read-outs thrown away after pretraining: per patch (shape, colour, cell), per image (pairs, count)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.shape = torch.nn.Linear(hidden, 1 + len(SHAPES))
        self.color = torch.nn.Linear(hidden, 1 + len(COLORS))
        self.cell = torch.nn.Linear(hidden, CELLS * CELLS)
        self.pairs = torch.nn.Linear(hidden, len(PAIRS))
        self.count = torch.nn.Linear(hidden, 4)

    def forward(self, tower, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = tower(pixel_values=pixels, output_hidden_states=True)
        patches = out.hidden_states[-2][:, 1:]  # (B, P, D): what LLaVA's projector reads
        cls = out.pooler_output  # (B, D): the last block's CLS after post_layernorm, CLIP's image embedding
        return {
            "shape": self.shape(patches), "color": self.color(patches), "cell": self.cell(patches),
            "pairs": self.pairs(cls), "count": self.count(cls),
        }  # fmt: skip


def pretrain_vision(
    data_dir: str | Path, out: str | Path, *,
    steps: int = 900, batch_size: int = 32, lr: float = 1e-3, holdout: int = 500, seed: int = 0,
    shape_weight: float = 2.0, cls_weight: float = 1.0,
) -> dict:  # fmt: skip
    """Train a fresh tower on ``data_dir`` (a `unclutter data shapes` folder); write it (safetensors + image
    processor + ``vision_pretrain.json``) to ``out`` and return the held-out accuracies and CLS attention ratios.

    Losses: cross-entropy per patch for shape (x ``shape_weight``: the harder label, a cell's background
    corners learn it from their neighbours), colour and cell; per image, binary cross-entropy over the 30
    objects (scaled by 30, so an image's labels weigh like one classification) and cross-entropy over the
    count, both x ``cls_weight``. The last ``holdout`` scenes are held out.
    """
    data_dir, out = Path(data_dir), Path(out)
    scenes = [scene for _, scene in read_jsonl(data_dir / "scenes.jsonl")]
    if len(scenes) <= holdout:
        raise ValueError(f"{data_dir}: {len(scenes)} scenes; need more than the {holdout} held out.")
    tower, processor = init_tower(seed)
    pixels = _load_pixels(data_dir, scenes, processor)
    grid = IMAGE_SIZE // VIT["patch_size"]
    cells = cell_of_patch(grid)
    per_cell = torch.tensor([cell_labels(s) for s in scenes])  # (N, 2, 9)
    patch_y = {"shape": per_cell[:, 0, cells], "color": per_cell[:, 1, cells], "cell": cells.expand(len(scenes), -1)}
    pairs = torch.tensor([scene_labels(s)[0] for s in scenes])
    count = torch.tensor([scene_labels(s)[1] for s in scenes])
    heads = Heads(VIT["hidden_size"])
    weights = {"shape": shape_weight, "color": 1.0, "cell": 1.0}

    def loss_fn(pred: dict, idx: torch.Tensor) -> torch.Tensor:
        loss = sum(w * F.cross_entropy(pred[k].flatten(0, 1), patch_y[k][idx].flatten()) for k, w in weights.items())
        cls = len(PAIRS) * F.binary_cross_entropy_with_logits(pred["pairs"], pairs[idx])
        return loss + cls_weight * (cls + F.cross_entropy(pred["count"], count[idx]))

    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min((t + 1) / warmup, 0.5 * (1 + math.cos(math.pi * t / steps)))
    )
    gen = torch.Generator().manual_seed(seed)
    train_n, log = len(scenes) - holdout, []
    tower.train()
    for step in range(steps):
        idx = torch.randint(0, train_n, (batch_size,), generator=gen)
        loss = loss_fn(heads(tower, pixels[idx]), idx)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 8) == 0:
            log.append({"step": step + 1, "loss": round(loss.item(), 4)})
            print(f"[vision] step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    tower.eval()
    held = torch.arange(train_n, len(scenes))
    with torch.no_grad():
        preds = [heads(tower, pixels[held[i : i + 64]]) for i in range(0, len(held), 64)]
    pred = {k: torch.cat([p[k] for p in preds]) for k in preds[0]}
    occupied = patch_y["shape"][held] > 0
    result: dict = {"steps": steps, "batch_size": batch_size, "lr": lr, "shape_weight": shape_weight}
    result |= {"cls_weight": cls_weight, "seed": seed, "log": log}
    for k in ("shape", "color"):  # patches of occupied cells, and of empty cells
        right = pred[k].argmax(-1) == patch_y[k][held]
        result[f"heldout_{k}_acc"] = round(right[occupied].float().mean().item(), 4)
        result[f"heldout_{k}_empty_acc"] = round(right[~occupied].float().mean().item(), 4)
    result["heldout_cell_acc"] = round((pred["cell"].argmax(-1) == patch_y["cell"][held]).float().mean().item(), 4)
    exact = ((pred["pairs"] > 0).float() == pairs[held]).all(-1)
    result["heldout_cls_objects_exact"] = round(exact.float().mean().item(), 4)  # all 30 presences right
    result["heldout_cls_count_acc"] = round((pred["count"].argmax(-1) == count[held]).float().mean().item(), 4)
    held_scenes = [scenes[i] for i in held.tolist()]
    result["cls_attention"] = cls_attention_ratio(tower, pixels[held], patch_coverage(held_scenes, VIT["patch_size"]))
    out.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    write_json_atomic(out / "vision_pretrain.json", result)  # the step's done-marker: never half written
    return result


@torch.no_grad()
def cls_attention_ratio(tower, pixels: torch.Tensor, coverage: torch.Tensor, batch: int = 64) -> list[dict]:
    """Per block: ``share`` of the CLS token's attention to patches that lands on object pixels (each patch's
    head-averaged attention weighted by the share of it the shapes cover), ``area`` (the share of the image the
    shapes cover) and ``ratio`` = share / area, averaged over images; 1.0 is attention blind to the objects.

    CLS's attention to itself is left out (VMTC ranks patches only)."""
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")  # attention weights come only from the eager path
    try:
        rows = []
        for i in range(0, len(pixels), batch):
            attn = tower(pixel_values=pixels[i : i + batch], output_attentions=True).attentions
            rows.append(torch.stack([a[:, :, 0, 1:].mean(1) for a in attn], 1))  # (B, blocks, P)
    finally:
        tower.set_attn_implementation(previous)
    cls = torch.cat(rows)
    cls = cls / cls.sum(-1, keepdim=True)
    share = (cls * coverage[:, None]).sum(-1)  # (N, blocks)
    area = coverage.mean(-1, keepdim=True)  # (N, 1)
    return [
        {"block": b, "share": round(share[:, b].mean().item(), 4), "area": round(area.mean().item(), 4),
         "ratio": round((share[:, b] / area[:, 0]).mean().item(), 3)}
        for b in range(cls.shape[1])
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """``pretrain DATA OUT [--steps N] [--seed S]`` | ``attention DATA TOWER`` (held-out CLS attention ratios)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m unclutter.shapes.vision")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="pretrain the ViT on the world's ground truth")
    p.add_argument("data_dir")
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=900, help="optimizer steps (batch 32)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("attention", help="CLS attention on objects against their area, per block")
    p.add_argument("data_dir")
    p.add_argument("tower")
    p.add_argument("--num", type=int, default=500)
    args = parser.parse_args(argv)
    if args.cmd == "pretrain":
        out = Path(args.out_dir)
        if (out / "vision_pretrain.json").is_file():  # resumable pipelines: a finished step is not redone
            print(f"{out} is already pretrained; delete it to redo.")
            return
        print(json.dumps(pretrain_vision(args.data_dir, out, steps=args.steps, seed=args.seed)))
        return
    from transformers import AutoImageProcessor, CLIPVisionModel

    scenes = [s for _, s in read_jsonl(Path(args.data_dir) / "scenes.jsonl")][: args.num]
    tower = CLIPVisionModel.from_pretrained(args.tower, use_safetensors=True).eval()
    pixels = _load_pixels(Path(args.data_dir), scenes, AutoImageProcessor.from_pretrained(args.tower))
    cover = patch_coverage(scenes, tower.config.patch_size)
    print(json.dumps(cls_attention_ratio(tower, pixels, cover), indent=1))


if __name__ == "__main__":
    main()
