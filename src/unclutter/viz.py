"""Pictures of what the method did to one image: VMTC's kept / merged patches per stage, and CMAI's
inhibited image patches per LLM layer for a generated token.

`visualize(model, processor, image, prompt)` runs one generation with VMTC + CMAI applied and
tracing on, then draws both. The image is shown as the processor crops it, so patches line up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import CMAIConfig, VMTCConfig
from .vmtc import VMTCInfo


@dataclass
class TokenGroup:
    """One token after a VMTC stage: the original patches it stands for."""

    patches: list[int]
    kept: bool  # kept at this stage (else a merged cluster)
    cluster: int  # cluster id at this stage, -1 for kept tokens


def trace_groups(infos: list[VMTCInfo], num_patches: int, sample: int = 0) -> list[list[TokenGroup]]:
    """Per stage, the output patch tokens (CLS excluded) in order, each with its original patches."""
    groups = [[i] for i in range(num_patches)]
    stages = []
    for info in infos:
        kept = info.kept_index[sample].tolist()
        merged = info.merged_index[sample].tolist()
        cluster = info.cluster[sample].tolist()
        out = [TokenGroup(groups[i], True, -1) for i in kept]
        for c in range(info.num_clusters):
            members = [p for j, cid in zip(merged, cluster, strict=True) if cid == c for p in groups[j]]
            out.append(TokenGroup(sorted(members), False, c))
        stages.append(out)
        groups = [g.patches for g in out]
    return stages


def shown_image(processor, image: Image.Image) -> np.ndarray:
    """The image as the model sees it (after resize / crop), as HxWx3 floats in [0, 1]."""
    ip = processor.image_processor
    pixels = ip(images=image, return_tensors="pt")["pixel_values"][0].float()
    mean = torch.tensor(getattr(ip, "image_mean", [0.0] * 3))[:, None, None]
    std = torch.tensor(getattr(ip, "image_std", [1.0] * 3))[:, None, None]
    return (pixels * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _patch_box(ax, p: int, grid: int, cell: float, **kw):
    from matplotlib.patches import Rectangle

    r, c = divmod(p, grid)
    ax.add_patch(Rectangle((c * cell - 0.5, r * cell - 0.5), cell, cell, **kw))


def vmtc_figure(img: np.ndarray, stages: list[list[TokenGroup]], grid: int, path: str | Path, titles=None) -> Path:
    """One panel per stage: kept patches outlined in white, merged clusters filled in one colour each."""
    plt = _plt()
    cmap = plt.get_cmap("tab20")
    n = len(stages)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.6 * (n + 1), 2.9))
    cell = img.shape[0] / grid
    axes[0].imshow(img)
    axes[0].set_title(f"input ({grid}x{grid} patches)", fontsize=8)
    for s, (ax, tokens) in enumerate(zip(axes[1:], stages, strict=True)):
        ax.imshow(img)
        for g in tokens:
            for p in g.patches:
                if g.kept:
                    _patch_box(ax, p, grid, cell, fill=False, edgecolor="white", linewidth=0.9)
                else:
                    _patch_box(ax, p, grid, cell, color=cmap(g.cluster % 20), alpha=0.55, linewidth=0)
        kept = sum(g.kept for g in tokens)
        title = titles[s] if titles else f"stage {s + 1}"
        ax.set_title(f"{title}: {kept} kept + {len(tokens) - kept} merged", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("VMTC: kept patches (white) and merged clusters (colours)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def inhibition_grid(inhibited: torch.Tensor, groups: list[list[int]], grid: int) -> np.ndarray:
    """(grid, grid) fraction of each patch's image token inhibited: ``inhibited`` (n,) over image tokens,
    ``groups[j]`` the patches image token j stands for (one each without VMTC)."""
    heat = np.zeros(grid * grid)
    for j, patches in enumerate(groups):
        for p in patches:
            heat[p] = float(inhibited[j])
    return heat.reshape(grid, grid)


def cmai_figure(
    img: np.ndarray, maps: dict[int, np.ndarray], gammas: dict[int, float], path: str | Path, token: str
) -> Path:
    """A grid of small heatmaps, one per LLM layer: red = image patch inhibited for ``token``."""
    plt = _plt()
    layers = sorted(maps)
    cols = min(8, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    for k, layer in enumerate(layers):
        ax = axes.flat[k]
        ax.axis("on")
        ax.imshow(img, alpha=0.55)
        h, w = img.shape[:2]
        ax.imshow(maps[layer], cmap="Reds", vmin=0, vmax=1, alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        ax.set_title(f"layer {layer}  γ={gammas.get(layer, 0.0):.2f}", fontsize=7)
    fig.suptitle(f"CMAI: image patches inhibited (red) when generating {token!r}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.inference_mode()
def visualize(
    model,
    processor,
    image: Image.Image,
    prompt: str,
    out_dir: str | Path,
    *,
    vmtc: VMTCConfig | None = None,
    cmai: CMAIConfig | None = None,
    token_index: int = 0,
    max_new_tokens: int = 32,
    prefix: str = "",
) -> dict:
    """Generate an answer with VMTC + CMAI applied and draw ``vmtc_tokens.png`` and ``cmai_inhibition.png``.

    ``token_index`` picks the generated token whose CMAI inhibition is drawn (0 = the first answer
    token). Returns the answer, the token and the written paths.
    """
    from . import apply
    from .evaluation.generation import build_prompt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vmtc = vmtc or VMTCConfig()
    cmai = cmai or CMAIConfig()
    handle = apply(model, processor, vmtc=vmtc, cmai=cmai)
    try:
        handle.cmai_state.tracing = True
        inputs = processor(images=[image], text=[build_prompt(processor, prompt)], return_tensors="pt").to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
        new = out[0, inputs["input_ids"].shape[1] :]
        answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        infos = list(handle.stage_infos)
        state = handle.cmai_state
        trace = dict(state.trace)
        gammas = dict(state.gammas)
        blocks = [st.layer for st in handle.stages]
    finally:
        handle.remove()

    if not infos:
        raise ValueError("VMTC ran no stage on this model; nothing to draw.")
    grid = math.isqrt(infos[0].importance.shape[1])
    img = shown_image(processor, image)
    stages = trace_groups(infos, grid * grid)
    paths = {
        "vmtc": vmtc_figure(
            img,
            stages,
            grid,
            out_dir / f"{prefix}vmtc_tokens.png",
            titles=[f"block {layer}" for layer in blocks],
        )  # fmt: skip
    }
    token_index = min(token_index, len(new) - 1)
    token = processor.tokenizer.decode(new[token_index : token_index + 1]).strip() or "<eos>"
    final = [g.patches for g in stages[-1]]
    num_layers = model.config.text_config.num_hidden_layers
    maps = {}
    for layer in range(num_layers):
        steps = trace.get(layer)
        row = steps[token_index][0] if steps and token_index < len(steps) else torch.zeros(len(final), dtype=torch.bool)
        maps[layer] = inhibition_grid(row, final, grid)
    paths["cmai"] = cmai_figure(img, maps, gammas, out_dir / f"{prefix}cmai_inhibition.png", token)
    return {
        "answer": answer,
        "token": token,
        "paths": paths,
        "inhibited": {k: float(v.mean()) for k, v in maps.items()},
    }
