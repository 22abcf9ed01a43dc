"""Pictures of what the method did to one image: VMTC's kept / merged patches per stage, and CMAI's
inhibited image patches per LLM layer for a generated token, for any supported family.

`visualize(model, processor, image, prompt)` runs one generation with VMTC + CMAI applied and tracing on, then
draws both, one row per tower input (tile) for tiled families (LLaVA-NeXT's base and high-res tiles, InternVL's
tiles and thumbnail, Idefics3's tiles and global image; Qwen's images and video frames). Each tile is shown as the
processor cut it, so units line up; a unit is what VMTC ranks (a patch, or a 2x2 pixel-shuffle block or merge unit, or
a 4x4 pooling window). Which tiles there are, the order the tower holds their units in, and where each tile token sits
among the prompt's image keys come from the adapter (`Adapter.vision_tiles`, `Adapter.stage_blocks`,
`Adapter.image_key_map`).
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


def trace_groups(
    infos: list[VMTCInfo],
    num_patches: int,
    sample: int = 0,
    units: list[int] | None = None,
    orders: list[list[int]] | None = None,
) -> list[list[TokenGroup]]:
    """Per stage, the output patch tokens (CLS excluded) in order, each with its original patches.

    ``units``: the patch (grid cell) of each token entering the first stage, in that order (default: patch order).
    ``orders``: per stage, the order its outputs move on in (``orders[s][j]``: the output index of the j-th token the
    next stage receives; `Tile.orders`), default: as output (kept tokens, then clusters). The last stage's groups are
    listed in the order its outputs leave."""
    groups = [[i] for i in (range(num_patches) if units is None else units)]
    stages = []
    for s, info in enumerate(infos):
        out = step_groups(groups, info, sample)
        if orders is not None:
            out = [out[j] for j in orders[s]]
        stages.append(out)
        groups = [g.patches for g in out]
    return stages


def step_groups(groups: list[list[int]], info: VMTCInfo, sample: int = 0) -> list[TokenGroup]:
    """One compression step's outputs (kept tokens, then clusters), each with the patches of its input tokens."""
    kept = info.kept_index[sample].tolist()
    merged = info.merged_index[sample].tolist()
    cluster = info.cluster[sample].tolist()
    out = [TokenGroup(groups[i], True, -1) for i in kept]
    for c in range(info.num_clusters):
        members = [p for j, cid in zip(merged, cluster, strict=True) if cid == c for p in groups[j]]
        out.append(TokenGroup(sorted(members), False, c))
    return out


def shown_image(processor, image: Image.Image) -> np.ndarray:
    """The image as the model sees it (after resize / crop), as HxWx3 floats in [0, 1]."""
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    return tile_image(processor, pixels)


def tile_image(processor, pixels: torch.Tensor) -> np.ndarray:
    """One (3, H, W) normalised tower input as HxWx3 floats in [0, 1]."""
    ip = processor.image_processor
    mean = torch.tensor(getattr(ip, "image_mean", None) or [0.0] * 3)[:, None, None]
    std = torch.tensor(getattr(ip, "image_std", None) or [1.0] * 3)[:, None, None]
    return (pixels.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else tuple(grid)


def _patch_box(ax, p: int, grid: tuple[int, int], cell: tuple[float, float], **kw):
    from matplotlib.patches import Rectangle

    r, c = divmod(p, grid[1])
    ax.add_patch(Rectangle((c * cell[1] - 0.5, r * cell[0] - 0.5), cell[1], cell[0], **kw))


def vmtc_figure(
    img: np.ndarray | list[np.ndarray],
    stages: list[list[TokenGroup]] | list[list[list[TokenGroup]]],
    grid: int | tuple[int, int] | list,
    path: str | Path,
    titles=None,
    names: list[str] | None = None,
) -> Path:
    """One panel per stage (one row per tile when given lists of tiles): kept units outlined in white, merged
    clusters filled in one colour each."""
    plt = _plt()
    cmap = plt.get_cmap("tab20")
    tiled = isinstance(img, list)
    imgs, all_stages, grids = (img, stages, grid) if tiled else ([img], [stages], [grid])
    n = len(all_stages[0])
    fig, axes = plt.subplots(len(imgs), n + 1, figsize=(2.6 * (n + 1), 2.9 * len(imgs)), squeeze=False)
    for row, (picture, tile_stages, tile_grid) in enumerate(zip(imgs, all_stages, grids, strict=True)):
        g = _grid(tile_grid)
        cell = (picture.shape[0] / g[0], picture.shape[1] / g[1])
        name = f"{names[row]}: " if names else ""
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title(f"{name}input ({g[0]}x{g[1]} units)", fontsize=8)
        for s_i, (ax, tokens) in enumerate(zip(axes[row, 1:], tile_stages, strict=True)):
            ax.imshow(picture)
            for grp in tokens:
                for p in grp.patches:
                    if grp.kept:
                        _patch_box(ax, p, g, cell, fill=False, edgecolor="white", linewidth=0.9)
                    else:
                        _patch_box(ax, p, g, cell, color=cmap(grp.cluster % 20), alpha=0.55, linewidth=0)
            kept = sum(grp.kept for grp in tokens)
            title = titles[s_i] if titles else f"stage {s_i + 1}"
            ax.set_title(f"{title}: {kept} kept + {len(tokens) - kept} merged", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("VMTC: kept units (white) and merged clusters (colours)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def inhibition_grid(inhibited: torch.Tensor, groups: list[list[int]], grid: int | tuple[int, int]) -> np.ndarray:
    """(rows, cols) fraction of each unit's image token inhibited: ``inhibited`` (n,) over image tokens,
    ``groups[j]`` the units image token j stands for (one each without VMTC)."""
    rows, cols = _grid(grid)
    heat = np.zeros(rows * cols)
    for j, patches in enumerate(groups):
        for p in patches:
            heat[p] = float(inhibited[j])
    return heat.reshape(rows, cols)


def cmai_figure(
    img: np.ndarray | list[np.ndarray],
    maps: dict[int, np.ndarray] | dict[int, list[np.ndarray]],
    gammas: dict[int, float],
    path: str | Path,
    token: str,
    names: list[str] | None = None,
) -> Path:
    """Small heatmaps, red = image unit inhibited for ``token``: one per LLM layer (8 a row) for one image; for
    tiles, one row per tile and one column per drawn layer (at most 8, evenly spaced, the last included)."""
    plt = _plt()
    layers = sorted(maps)
    tiled = isinstance(img, list)
    if tiled:
        shown = sorted({layers[round(i * (len(layers) - 1) / 7)] for i in range(8)}) if len(layers) > 8 else layers
        panels = [(t, layer) for t in range(len(img)) for layer in shown]
        rows, cols = len(img), len(shown)
    else:
        panels = [(None, layer) for layer in layers]
        cols = min(8, len(layers))
        rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    for k, (t, layer) in enumerate(panels):
        ax = axes.flat[k]
        picture, heat = (img, maps[layer]) if t is None else (img[t], maps[layer][t])
        ax.axis("on")
        ax.imshow(picture, alpha=0.55)
        h, w = picture.shape[:2]
        ax.imshow(heat, cmap="Reds", vmin=0, vmax=1, alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        where = f"{names[t]}, " if t is not None and names else ""
        ax.set_title(f"{where}layer {layer}  γ={gammas.get(layer, 0.0):.2f}", fontsize=7)
    fig.suptitle(f"CMAI: image units inhibited (red) when generating {token!r}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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

    ``token_index`` picks the generated token whose CMAI inhibition is drawn (0 = the first answer token). Returns
    the answer, the token, the written paths, the tiles' names, and per LLM layer the share of the image's units
    (``inhibited``) and of its image keys (``inhibited_keys``) inhibited for that token.
    """
    from . import apply
    from .evaluation.generation import build_prompt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = apply(model, processor, vmtc=vmtc or VMTCConfig(), cmai=cmai or CMAIConfig())
    try:
        handle.cmai_state.tracing = True
        # built outside inference mode: the processor's tensors stay ordinary ones (adapters may track them)
        inputs = processor(images=[[image]], text=[build_prompt(processor, prompt)], return_tensors="pt")
        inputs = inputs.to(model.device)
        for key, value in inputs.items():
            if key.startswith("pixel_values") and value.is_floating_point():
                inputs[key] = value.to(model.dtype)
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
            )
        new = out[0, inputs["input_ids"].shape[1] :]
        answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        if not handle.stage_infos:
            raise ValueError(
                f"VMTC recorded no stage for this image (handle.stage_infos is empty), so there is nothing to draw: "
                f"{handle.adapter.family} kept every unit of it (ratio 1.0, or a token budget at least its unit "
                "count); lower vmtc.ratio or vmtc.num_tokens."
            )
        infos, post = list(handle.stage_infos), dict(handle.post_infos)
        tiles = handle.adapter.vision_tiles(handle, inputs)
        keys = handle.adapter.image_key_map(handle, inputs)
        trace, gammas = dict(handle.cmai_state.trace), dict(handle.cmai_state.gammas)
        blocks = handle.adapter.stage_blocks(handle)
        num_layers = model.config.get_text_config().num_hidden_layers
    finally:
        handle.remove()

    imgs = [tile_image(processor, t.pixels) for t in tiles]
    stages = [trace_groups(infos, t.grid[0] * t.grid[1], t.row, t.units, t.orders) for t in tiles]
    names = [t.name for t in tiles]
    titles = [f"block {layer}" for layer in blocks]
    if post:  # a compression after the tower for some tiles (anyres high-res share); the others pass it unchanged
        for t, tile_stages in zip(tiles, stages, strict=True):
            last = tile_stages[-1]
            step = post.get(t.row)
            tile_stages.append(list(last) if step is None else step_groups([g.patches for g in last], step))
        titles.append("after the tower")
    one = len(tiles) == 1
    path = out_dir / f"{prefix}vmtc_tokens.png"
    paths = {
        "vmtc": vmtc_figure(imgs[0], stages[0], tiles[0].grid, path, titles=titles)
        if one
        else vmtc_figure(imgs, stages, [t.grid for t in tiles], path, titles=titles, names=names)
    }
    if token_index >= len(new):
        raise ValueError(
            f"token index {token_index} is past the answer, which has {len(new)} generated token(s) ({answer!r}); "
            f"choose 0 to {len(new) - 1}."
        )
    token = processor.tokenizer.decode(new[token_index : token_index + 1]).strip() or "<eos>"
    final = [[g.patches for g in tile_stages[-1]] for tile_stages in stages]
    for t, (where, groups) in enumerate(zip(tiles, final, strict=True)):
        held = sorted(k[1] for k in keys if k is not None and k[0] == t)
        if held != list(range(len(groups))):
            raise ValueError(
                f"{type(handle.adapter).__name__}.image_key_map places {len(held)} keys on {where.name}, which sends "
                f"{len(groups)} tokens: the adapter's picture layout is wrong for this input."
            )
    maps, shares = {}, {}
    for layer in range(num_layers):
        steps = trace.get(layer)
        row = steps[token_index][0] if steps and token_index < len(steps) else torch.zeros(len(keys), dtype=torch.bool)
        if len(row) != len(keys):
            raise ValueError(
                f"CMAI traced {len(row)} image keys but {type(handle.adapter).__name__}.image_key_map gives {len(keys)}."
            )
        per_tile = [torch.zeros(len(groups), dtype=torch.bool) for groups in final]
        for k, flag in zip(keys, row.tolist(), strict=True):
            if k is not None:
                per_tile[k[0]][k[1]] = flag
        maps[layer] = [inhibition_grid(p, g, t.grid) for p, g, t in zip(per_tile, final, tiles, strict=True)]
        shares[layer] = float(row.float().mean()) if len(row) else 0.0
    path = out_dir / f"{prefix}cmai_inhibition.png"
    paths["cmai"] = (
        cmai_figure(imgs[0], {k: v[0] for k, v in maps.items()}, gammas, path, token)
        if one
        else cmai_figure(imgs, maps, gammas, path, token, names=names)
    )
    return {
        "answer": answer,
        "token": token,
        "paths": paths,
        "tiles": names,
        "inhibited": {k: float(np.mean([m.mean() for m in v])) for k, v in maps.items()},
        "inhibited_keys": shares,
    }
