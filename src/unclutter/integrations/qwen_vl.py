"""Qwen2.5-VL and Qwen3-VL: what both families share (the family files `qwen2_5_vl.py`, `qwen3_vl.py` run the towers).

CMAI. Image and video pad tokens (``<|image_pad|>``, ``<|video_pad|>``) are the image keys. ``<|vision_start|>``
and ``<|vision_end|>`` are structural: they bracket every image, video and (Qwen3-VL) video frame and carry no
pixels and no instruction, so they are neither text queries nor part of A_t2n, and never inhibited. (Counted as
text, each ``<|vision_end|>`` would be a "text" row right after its image's pads that dominates A_t2n for the
instruction after it.) Qwen3-VL's frame timestamps (``<0.5 seconds>``) are ordinary words and count as text.

VMTC. The ViT has no CLS token and packs every image (and every video frame) into one ``(sequence, dim)`` input
split by ``cu_seqlens``; its patch merger turns each 2x2 group of consecutive patches (a merge unit) into one LLM
token. A stage, between a block's attention and its MLP:

1. ranks patches by the attention they *receive* (`vmtc.received_importance`) from the block's own queries and
   keys after the 2-D rotary embedding, within each sequence the block attends over (a frame for full-attention
   blocks, a window for Qwen2.5-VL's windowed ones); a unit's importance is the mean of its 4 patches';
2. keeps each frame's top units and merges the rest with cosine K-means into importance-weighted mean units
   (`vmtc.compress(has_cls=False)` on the ``(units, 4 * dim)`` view), so the merger still sees whole units and
   emits exactly the budget. Budgets are per frame: ``ratio`` of the frame's own unit count (``num_tokens`` caps
   each frame; smaller frames keep everything; likewise an explicit ``clusters`` above a small frame's stage
   output is lowered to it);
3. keeps the tower consistent for later blocks: a kept unit keeps its rotary embedding, window and grid
   position; a merged unit takes those of its most important member (a real grid cell, distinct from every kept
   unit); ``cu_seqlens`` and the window boundaries are rebuilt from the shorter frames, units stay in the tower's
   order, so windows stay contiguous;
4. emits units in raster order of their grid positions. The LLM's M-RoPE positions of the compressed prompt are
   the stock (t, h, w) positions of those grid cells: `get_rope_index` is overridden on the model instance and
   computes them with the stock function on the prompt re-expanded to its stock length, then picks the emitted
   cells (text positions are unchanged, so the prompt after an image reads exactly as in the stock model).

Pictures (`unclutter.viz`): after a vision forward whose frames share one size (one plan), ``handle.stage_infos``
holds one `VMTCInfo` per stage that compressed, a row per image / video frame, indexing each frame's units in the
order the stage received them; `vision_tiles` unpacks the processor's patches into one tile per image / frame and
gives the tower's unit order (`Tile.units`, `Tile.orders`). Frames of different sizes have no common rows: then it
stays empty.

`generate` computes position ids before it encodes the images, so the overridden `get_rope_index` encodes them
itself when it gets the pixels and hands its features to the encode call that follows (one vision pass); inside
a forward it reads the layout of the images that forward just encoded. The processor expands every image and
video frame to its compressed count through its own `replace_image_token` / `replace_video_token` and
`_get_num_multimodal_tokens`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import vmtc as vmtc_math
from .._amp import autocast_off
from ..config import VMTCConfig
from .base import Adapter, Handle, Tile
from .vision import VMTCStage, plan_vmtc

MODALITIES = (("image", 1, "pixel_values", "image_grid_thw"), ("video", 2, "pixel_values_videos", "video_grid_thw"))


# ---- the compressed layout the LLM sees -----------------------------------------------------------------------


@dataclass
class Layout:
    """Which merge units of one image (or video) reach the LLM, in emitted order.

    units: (n,) long raster index (frame, row, column) of each emitted token's grid cell within its grid.
    grid: (frames, rows, columns) in merge units.
    """

    units: torch.Tensor
    grid: tuple[int, int, int]

    def frames(self) -> list[torch.Tensor]:
        """Per frame, the emitted cells' raster index within the frame."""
        per_frame = self.grid[1] * self.grid[2]
        frame = self.units // per_frame
        return [self.units[frame == f] - f * per_frame for f in range(self.grid[0])]

    def runs(self, per_frame: bool) -> list[tuple[int, torch.Tensor]]:
        """The pad runs this item fills in a prompt, each as (stock length, emitted cells' index within the run):
        one run, or one per frame (Qwen3-VL's videos)."""
        if per_frame:
            return [(self.grid[1] * self.grid[2], cells) for cells in self.frames()]
        return [(math.prod(self.grid), self.units)]


@dataclass
class StageRecord:
    """What one stage did in the last vision forward (for tests and pictures).

    importance: (patches,) float32 received importance of every patch entering the stage, in the tower's order.
    cu_seqlens: the sequences it was computed over (the block's attention pattern).
    """

    layer: int
    importance: torch.Tensor
    cu_seqlens: torch.Tensor


@dataclass
class StageStep:
    """What one stage did to the frames of one size in the last vision forward (for pictures).

    stage: the stage's index in the per-frame plan. frames: the frames (numbered over the forward's grids) it
    compressed, one row each of: info: the `VMTCInfo`, indices of each frame's units in the order the stage
    received them; cells: (B, N) raster cell (within its frame's grid of merge units) of each unit it received;
    order: (B, k + c) the order its outputs (kept units, then clusters) move on in (the tower's order): ``order[b,
    j]`` is the output index of the j-th unit after the stage.
    """

    stage: int
    frames: list[int]
    info: vmtc_math.VMTCInfo
    cells: torch.Tensor
    order: torch.Tensor


@dataclass
class Trace:
    """The last vision forward (for pictures): the modality it encoded, its grids and the frames' stage steps."""

    modality: str
    grid: list[list[int]]
    frame_units: list[int]
    steps: list[StageStep]

    @property
    def uniform(self) -> bool:
        """All frames have one size, so one plan: every step holds every frame, a `VMTCInfo` row each."""
        return len(set(self.frame_units)) <= 1


class Budget:
    """Per-frame VMTC stages, planned once per frame size (units per frame)."""

    def __init__(self, cfg: VMTCConfig, layers: list[int], last_block: int) -> None:
        if cfg.stage_tokens is not None:
            raise ValueError(
                "VMTCConfig.stage_tokens fixes one count per stage, but Qwen images have different sizes; use "
                "ratio (or num_tokens) and the geometric per-stage schedule."
            )
        self.cfg, self.layers, self.last_block = dataclasses.replace(cfg, layers=tuple(layers)), layers, last_block
        self._plans: dict[int, list[VMTCStage]] = {}

    def stages(self, units: int) -> list[VMTCStage]:
        if units not in self._plans:
            cfg = self.cfg
            if cfg.num_tokens is not None:
                cfg = dataclasses.replace(cfg, num_tokens=min(cfg.num_tokens, units))
            self._plans[units] = plan_vmtc(cfg, units, self.last_block, cap_clusters=True)
        return self._plans[units]

    def tokens(self, units: int) -> int:
        """LLM tokens a frame of ``units`` merge units is compressed to."""
        return self.stages(units)[-1].tokens_out


# ---- the packed vision sequence and one stage's compression -------------------------------------------------------


class Packed:
    """Per-unit facts of the tower's packed sequence: all images and frames, merge units contiguous.

    frame: (U,) frame id (frames of all grids numbered in order); rep: (U,) global raster index of the grid cell a
    unit stands for; key: (U,) the unit's place in the tower's original order (units stay sorted by it within a
    frame); window: (U,) window id (Qwen2.5-VL's windowed blocks) or None. ``frame_units``: original units per frame,
    which fixes the frame's budget.
    """

    def __init__(self, grid: torch.Tensor, merge: int, order: torch.Tensor, window: torch.Tensor | None) -> None:
        unit = merge * merge
        per_frame = (grid[:, 1] * grid[:, 2]) // unit
        self.frame_units = per_frame.repeat_interleave(grid[:, 0]).tolist()
        frame_of_cell = torch.arange(len(self.frame_units), device=order.device).repeat_interleave(
            torch.tensor(self.frame_units, device=order.device)
        )
        self.unit, self.merge, self.grid = unit, merge, grid
        self.rep, self.key, self.window = order, torch.arange(order.numel(), device=order.device), window
        self.frame = frame_of_cell[order]
        sizes = torch.tensor(self.frame_units, device=order.device)
        self.first_cell = sizes.cumsum(0) - sizes  # global raster index of each frame's first cell
        self.steps: list[StageStep] = []  # what each stage did, for pictures

    def _cumulative(self, ids: torch.Tensor) -> torch.Tensor:
        _, counts = torch.unique_consecutive(ids, return_counts=True)
        return F.pad((counts * self.unit).cumsum(0, dtype=torch.int32), (1, 0))

    def cu_seqlens(self) -> torch.Tensor:
        """Full attention: one sequence per frame (as the stock tower)."""
        return self._cumulative(self.frame)

    def cu_windows(self) -> torch.Tensor:
        """Windowed attention: one sequence per (non-empty) window, kept units staying in their windows."""
        return self._cumulative(self.window)

    def layouts(self) -> tuple[torch.Tensor, list[Layout]]:
        """The order that emits units in raster order of their grid cells, and each grid's `Layout`."""
        order = torch.argsort(self.rep, stable=True)
        cells = self.rep[order]
        layouts, start = [], 0
        for t, h, w in self.grid.tolist():
            size = t * h * w // self.unit
            mine = (cells >= start) & (cells < start + size)
            layouts.append(Layout(cells[mine] - start, (t, h // self.merge, w // self.merge)))
            start += size
        return order, layouts

    def compress(
        self, x: torch.Tensor, importance: torch.Tensor, stage: int, budget: Budget, extras: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Compress every frame of the packed ``x`` (N, D) at stage ``stage`` of its own per-frame plan.

        importance: (N,) per patch. extras: other (N, D') tensors in the same order (Qwen3-VL's DeepStack
        captures) that get the same keep/merge, with the same weights (`replay`). Returns the new ``x``, the new
        extras and the source unit of every new unit ((U',) long: itself when kept, the most important member when
        merged), and updates the per-unit facts. Frames of one size share a plan and are compressed in one batch.
        """
        units = x.shape[0] // self.unit
        tensors = [t.reshape(units, -1) for t in (x, *extras)]  # (U, unit * D): one row per merge unit
        unit_importance = importance.float().reshape(units, self.unit).mean(dim=1)
        counts = torch.bincount(self.frame, minlength=len(self.frame_units)).tolist()
        starts = [0, *torch.tensor(counts).cumsum(0).tolist()[:-1]]
        groups: dict[int, list[int]] = {}
        for f, size in enumerate(self.frame_units):
            groups.setdefault(size, []).append(f)
        pieces = []  # per group: its frames, new rows (B, L', .) of every tensor, their sources (B, L')
        for size, frames in groups.items():
            plan = budget.stages(size)[stage]
            if any(counts[f] != plan.tokens_in for f in frames):
                raise RuntimeError(
                    f"VMTC stage {stage}: frames of {size} units do not hold {plan.tokens_in} units now."
                )
            idx = torch.tensor([starts[f] for f in frames], device=x.device)[:, None]
            idx = idx + torch.arange(plan.tokens_in, device=x.device)  # (B, L) unit index of each frame's units
            if plan.identity:
                pieces.append((frames, [t[idx] for t in tensors], idx))
                continue
            cfg = budget.cfg
            out, info = vmtc_math.compress(
                tensors[0][idx], unit_importance[idx], plan.keep, plan.clusters,
                merge=cfg.merge, normalize=cfg.normalize, iters=cfg.kmeans_iters, has_cls=False,
            )  # fmt: skip
            rows = [out, *(replay(t[idx], info, cfg.normalize) for t in tensors[1:])]
            source = torch.cat([idx.gather(1, info.kept_index), idx.gather(1, _representatives(info))], dim=1)
            perm = torch.argsort(self.key[source], dim=1)  # back to the tower's order: windows stay contiguous
            rows = [r.gather(1, perm[..., None].expand(-1, -1, r.shape[-1])) for r in rows]
            cells = self.rep[idx] - self.first_cell[frames][:, None]
            self.steps.append(StageStep(stage, frames, info, cells, perm))
            pieces.append((frames, rows, source.gather(1, perm)))
        new, source = _assemble(pieces, len(counts))
        self.rep, self.key, self.frame = self.rep[source], self.key[source], self.frame[source]
        if self.window is not None:
            self.window = self.window[source]
            if torch.unique_consecutive(self.window).numel() != torch.unique(self.window).numel():
                raise RuntimeError("VMTC split a window of the compressed sequence; this is a bug, please report it.")
        new = [n.reshape(-1, t.shape[-1]) for n, t in zip(new, (x, *extras), strict=True)]
        return new[0], new[1:], source


def _version(t: torch.Tensor) -> int | None:
    """In-place modification counter; inference-mode tensors have none (identity is checked alongside)."""
    return None if t.is_inference() else t._version


def _assemble(pieces: list, frames: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Lay the compressed frames of every group out again in frame order: (U', .) tensors and sources (U',)."""
    lengths = [0] * frames
    for group, rows, _ in pieces:
        for f in group:
            lengths[f] = rows[0].shape[1]
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()[:-1]]
    first_rows, first_source = pieces[0][1], pieces[0][2]
    out = [r.new_empty(sum(lengths), r.shape[-1]) for r in first_rows]
    source = first_source.new_empty(sum(lengths))
    for group, rows, src in pieces:
        dst = torch.tensor([starts[f] for f in group], device=src.device)[:, None]
        dst = (dst + torch.arange(src.shape[1], device=src.device)).reshape(-1)
        for target, r in zip(out, rows, strict=True):
            target[dst] = r.reshape(-1, r.shape[-1])
        source[dst] = src.reshape(-1)
    return out, source


def _representatives(info: vmtc_math.VMTCInfo) -> torch.Tensor:
    """(B, c) position (among the stage's input units) of each cluster's most important member."""
    c = info.num_clusters
    if c == 0:
        return info.merged_index[:, :0]
    weight = info.importance.gather(1, info.merged_index)  # (B, R)
    member = F.one_hot(info.cluster, c).bool()  # (B, R, c)
    best = weight[..., None].masked_fill(~member, float("-inf")).argmax(dim=1)  # (B, c): first of equal maxima
    return info.merged_index.gather(1, best)


@autocast_off
def replay(x: torch.Tensor, info: vmtc_math.VMTCInfo, normalize: bool) -> torch.Tensor:
    """Apply a finished `vmtc.compress` step (same kept units, clusters and weights) to other features.

    x: (B, N, D) in the step's input order. Returns (B, k + c, D) laid out like `compress`'s output, with the
    same arithmetic (Eq. 7, optionally normalised), so replaying on the step's own input reproduces its output.
    """
    d = x.shape[-1]
    kept = x.gather(1, info.kept_index[..., None].expand(-1, -1, d))
    c = info.num_clusters
    if c == 0:
        return kept
    redundant = x.gather(1, info.merged_index[..., None].expand(-1, -1, d))
    weight = info.importance.gather(1, info.merged_index).float()
    one_hot = F.one_hot(info.cluster, c).to(weight.dtype)
    w = one_hot * weight[..., None]
    merged = w.transpose(1, 2) @ redundant.float()
    if normalize:
        mass = w.sum(dim=1)[..., None]
        plain = (one_hot.transpose(1, 2) @ redundant.float()) / one_hot.sum(dim=1)[..., None]
        merged = torch.where(mass > 0, merged / mass.clamp_min(torch.finfo(mass.dtype).tiny), plain)
    return torch.cat([kept, merged.to(x.dtype)], dim=1)


def sequence_importance(q: torch.Tensor, k: torch.Tensor, scale: float, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(N,) received importance of every patch within its own attention sequence.

    q, k: (N, heads, head_dim) after the rotary embedding. Sequences of equal length are ranked in one batch.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    starts = cu_seqlens[:-1].tolist()
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    groups: dict[int, list[int]] = {}
    for s, length in zip(starts, lengths, strict=True):
        groups.setdefault(length, []).append(s)
    for length, first in groups.items():
        idx = torch.tensor(first, device=q.device)[:, None] + torch.arange(length, device=q.device)
        out[idx] = vmtc_math.received_importance(q[idx].transpose(1, 2), k[idx].transpose(1, 2), scale)
    return out


# ---- the adapter both families share -----------------------------------------------------------------------------


class QwenVLAdapter(Adapter):
    """What Qwen2.5-VL and Qwen3-VL share. A family subclass runs its tower (`run_tower`) over these helpers."""

    default_importance = "received"  # the Qwen ViT has no CLS token
    vmtc = True
    video_run_per_frame = False  # Qwen3-VL writes one <|vision_start|>...<|vision_end|> block per video frame

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.budget: Budget | None = None
        self.records: list[StageRecord] = []  # the last vision forward's stages
        self._last: dict[str, list[Layout]] = {}  # layouts of the images the current forward encoded
        self._pending: dict[str, tuple] = {}  # features get_rope_index encoded for generate's encode call
        self.handle: Handle | None = None
        self.trace: Trace | None = None  # the last vision forward's stages (pictures)

    def structural_token_ids(self) -> list[int]:
        ids = [getattr(self.config, name, None) for name in ("vision_start_token_id", "vision_end_token_id")]
        if any(i is None for i in ids):
            raise ValueError(
                f"{type(self.config).__name__} names no vision_start/vision_end token id; CMAI needs them to tell "
                "image markers from text."
            )
        return ids

    # --- planning ----------------------------------------------------------------------------------------------
    def candidate_layers(self) -> list[int]:
        """Blocks a default plan may place stages on (all; Qwen2.5-VL: its full-attention blocks)."""
        return list(range(self.config.vision_config.depth))

    def stage_layers(self, cfg: VMTCConfig) -> list[int]:
        if cfg.layers is not None:
            return list(cfg.layers)
        blocks = self.candidate_layers()
        n = cfg.num_stages if cfg.num_stages is not None else min(4, len(blocks))
        if n > len(blocks):
            raise ValueError(
                f"VMTCConfig.num_stages={n} exceeds the {len(blocks)} blocks {self.family} places stages on "
                f"({blocks}); lower it or pass layers=... explicitly."
            )
        return [blocks[i] for i in vmtc_math.stage_layers(len(blocks) - 1, n)]

    @property
    def active(self) -> bool:
        return self.budget is not None

    def plan(self, handle: Handle) -> None:
        cfg = handle.vmtc
        if cfg is None or (cfg.num_tokens is None and cfg.ratio == 1.0):
            return  # nothing to compress: the stock model (ratio 1.0 is stock exactly)
        if handle.importance != "received":
            raise ValueError(f"{self.family}'s vision tower has no CLS token: use importance='received' (the default).")
        last, layers = self.config.vision_config.depth - 1, self.stage_layers(cfg)
        if layers[0] < 0 or layers[-1] > last:
            raise ValueError(f"VMTC layers {layers} must lie in [0, {last}] ({self.family}'s vision blocks).")
        if isinstance(cfg.clusters, tuple) and len(cfg.clusters) != len(layers):  # known now, not only per frame size
            raise ValueError(
                f"VMTCConfig.clusters has {len(cfg.clusters)} values for {len(layers)} stages (blocks {layers}): "
                "give one per stage, or one int for all."
            )
        self.budget = Budget(cfg, layers, last)  # stages are planned per frame size when a frame of that size comes

    def install(self, handle: Handle) -> None:
        if not self.active:
            return
        self.handle = handle
        base = self.base
        stock_rope = base.get_rope_index

        def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
            return self.encode("image", pixel_values, image_grid_thw, kwargs)

        def get_video_features(pixel_values_videos, video_grid_thw=None, **kwargs):
            return self.encode("video", pixel_values_videos, video_grid_thw, kwargs)

        def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None, **kwargs):
            return self.rope_index(stock_rope, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, kwargs)

        handle.override(base, "get_image_features", get_image_features)
        handle.override(base, "get_video_features", get_video_features)
        handle.override(base, "get_rope_index", get_rope_index)
        if handle.processor is not None:
            self.patch_processor(handle, handle.processor)

    # --- encoding ----------------------------------------------------------------------------------------------
    def run_tower(self, pixels: torch.Tensor, grid: torch.Tensor):
        """The family's compressed tower: last hidden states (tower order), merged units (U', out) in tower order,
        the `Packed` facts, and the DeepStack features (each (U', out)) or None."""
        raise NotImplementedError

    def encode(self, modality: str, pixels: torch.Tensor, grid: torch.Tensor, kwargs: dict):
        """``get_image_features`` / ``get_video_features`` with VMTC: per-item features of the compressed counts."""
        extra = sorted(k for k, v in kwargs.items() if v is not None and v is not False and k != "return_dict")
        if extra:
            raise ValueError(
                f"VMTC's {self.family} vision forward does not support {extra} (per-block outputs or "
                "precomputed tower inputs); call the model without them while VMTC is applied."
            )
        if grid is None:
            raise ValueError(f"{self.family} needs {modality}_grid_thw with the pixels.")
        pixels_then, version, grid_then, output = self._pending.pop(modality, (None, None, None, None))
        if not (pixels_then is pixels and version == _version(pixels) and torch.equal(grid_then, grid)):
            output = self._encode(modality, pixels, grid)  # not what get_rope_index just encoded: encode these
        self._last[modality] = output.unclutter_layouts
        return output

    def _encode(self, modality: str, pixels: torch.Tensor, grid: torch.Tensor):
        hidden, merged, packed, deepstack = self.run_tower(pixels.type(self.base.visual.dtype), grid)
        self.trace = Trace(modality, grid.tolist(), packed.frame_units, packed.steps)
        if self.handle is not None:  # one VMTCInfo per stage, a row per frame, when the frames share one plan
            self.handle.stage_infos = [step.info for step in packed.steps] if self.trace.uniform else []
        order, layouts = packed.layouts()
        sizes = [layout.units.numel() for layout in layouts]
        fields = {"last_hidden_state": hidden, "pooler_output": torch.split(merged[order], sizes)}
        if deepstack is not None:
            fields["deepstack_features"] = [torch.split(f[order], sizes) for f in deepstack]
        output = self.output_class(**fields)
        output.unclutter_layouts = layouts  # which grid cells each item kept: the rope override places them
        return output

    @torch.compiler.disable  # a hook registered per call and host-side packing: torch.compile traced it wrongly
    def stage_block(self, index: int, block: nn.Module, h, cu_seqlens, position_embeddings, packed: Packed, captures):
        """A ViT block with VMTC between attention and MLP. Returns (hidden, position embeddings)."""
        for name in ("norm1", "attn", "norm2", "mlp"):
            if not hasattr(block, name):
                raise TypeError(f"{self.family} vision block {index} has no `{name}`; VMTC knows another layout.")
        attn = block.attn
        grabbed = {}
        hook = attn.qkv.register_forward_hook(lambda module, args, out: grabbed.setdefault("qkv", out))
        try:
            h = h + attn(block.norm1(h), cu_seqlens=cu_seqlens, position_embeddings=position_embeddings)
        finally:
            hook.remove()
        if "qkv" not in grabbed:
            raise RuntimeError(
                f"{self.family} vision block {index}: its qkv projection did not run; cannot rank patches."
            )
        n = h.shape[0]
        qkv = grabbed["qkv"].reshape(n, 3, attn.num_heads, -1)
        q, k = self.rotary(qkv[:, 0], qkv[:, 1], *position_embeddings)  # what the block attended with
        importance = sequence_importance(q, k, attn.scaling, cu_seqlens)
        self.records.append(StageRecord(index, importance, cu_seqlens))
        stage = self.budget.layers.index(index)
        h, compressed, source = packed.compress(h, importance, stage, self.budget, captures)
        captures[:] = compressed  # earlier DeepStack captures follow this stage's keep/merge
        rows = (source[:, None] * packed.unit + torch.arange(packed.unit, device=h.device)).reshape(-1)
        position_embeddings = tuple(p[rows] for p in position_embeddings)
        return h + block.mlp(block.norm2(h)), position_embeddings

    def run_blocks(self, h, position_embeddings, packed: Packed, full_blocks, capture_at=()):
        """All blocks in order, stages where planned. Returns the hidden states and those after ``capture_at``."""
        self.records, captures = [], []
        for i, block in enumerate(self.base.visual.blocks):
            cu = packed.cu_seqlens() if i in full_blocks else packed.cu_windows()
            if i in self.budget.layers:
                h, position_embeddings = self.stage_block(i, block, h, cu, position_embeddings, packed, captures)
            else:
                h = block(h, cu_seqlens=cu, position_embeddings=position_embeddings)
            if i in capture_at:
                captures.append(h)
        return h, captures

    # --- LLM positions ---------------------------------------------------------------------------------------
    def rope_index(self, stock, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, kwargs):
        """The stock M-RoPE positions of the compressed prompt: text as stock, each image token at its grid cell."""
        if mm_token_type_ids is None:
            raise ValueError("Qwen's 3-D positions need mm_token_type_ids (the processor returns them).")
        attention_mask = kwargs.pop("attention_mask", None)
        grids = {"image": image_grid_thw, "video": video_grid_thw}
        encoded = kwargs.get("mm_encoder_outputs") or {}
        entries = {}
        for modality, type_id, pixel_key, _ in MODALITIES:
            if grids[modality] is None:
                continue
            if encoded.get(modality) is not None:  # features encoded before this call: their own cells
                layouts = _encoded_layouts(modality, encoded[modality])
            else:
                layouts = self._layouts_for(modality, kwargs.get(pixel_key), grids[modality])
            per_frame = modality == "video" and self.video_run_per_frame
            entries[type_id] = [(cells.numel(), size, cells) for x in layouts for size, cells in x.runs(per_frame)]
        return compressed_rope_index(
            stock, input_ids, mm_token_type_ids, attention_mask, entries, image_grid_thw, video_grid_thw, kwargs
        )

    def _layouts_for(self, modality: str, pixels, grid) -> list[Layout]:
        """The cells each item keeps, from the pixels (encoded now) or from the last vision forward."""
        if pixels is not None:  # generate(): positions come first; encode now and hand the features on
            output = self._encode(modality, pixels, grid)
            self._pending[modality] = (pixels, _version(pixels), grid.clone(), output)
            return output.unclutter_layouts
        layouts = self._last.get(modality)
        if layouts is None or [list(g) for g in grid.tolist()] != [_stock_grid(x, self.merge) for x in layouts]:
            raise RuntimeError(
                f"VMTC cannot place the compressed {modality} tokens: get_rope_index was called without the "
                f"{modality}s being encoded in this forward. Call the model (or generate) with the pixels, or pass "
                "the pixels to get_rope_index."
            )
        return layouts

    @property
    def merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def vision_modules(self) -> tuple[nn.Module, nn.Module]:
        """VMTC runs ``visual``'s blocks itself, but both paths start at the patch embedding and end at the merger."""
        return self.base.visual.patch_embed, self.base.visual.merger

    # --- pictures: each image (video frame) as its 2x2 merge units --------------------------------------------------
    def _uniform_trace(self, handle: Handle) -> Trace:
        trace = self.trace
        if trace is None or not trace.steps:
            raise ValueError(f"{self.family}: the last vision forward recorded no VMTC stage (handle.stage_infos).")
        if not trace.uniform:
            raise ValueError(
                f"{self.family}: the last vision forward packed {trace.modality} frames of different sizes "
                f"({sorted(set(trace.frame_units))} merge units), which VMTC plans separately, so handle.stage_infos "
                "has no row per frame; draw one image (or images of one size) at a time."
            )
        return trace

    def vision_tiles(self, handle: Handle, inputs: dict) -> list[Tile]:
        """One tile per image (per frame of a video) of the last vision forward, a row of every `VMTCInfo` each.

        The processor resizes each image to a grid of ``patch`` px patches and flattens them merge unit by merge
        unit (the 2x2 patches of a unit contiguous, units in raster order, each patch repeated over the temporal
        patch): that layout is undone here (a video frame shows the first picture of its temporal pair). A unit is
        ``merge * patch`` px square; the tower receives units in its own order (Qwen2.5-VL: window by window), which
        `Tile.units` gives, and keeps them in that order after each stage (`Tile.orders`).
        """
        trace = self._uniform_trace(handle)
        _, _, pixel_key, grid_key = next(m for m in MODALITIES if m[0] == trace.modality)
        pixels, grid = inputs.get(pixel_key), inputs.get(grid_key)
        if pixels is None or grid is None or grid.tolist() != trace.grid:
            raise ValueError(
                f"{self.family}: these inputs' {grid_key} is not that of the last vision forward ({trace.grid}); "
                "pass the processor output the model just ran on."
            )
        vision, m = self.config.vision_config, self.merge
        patch, step = vision.patch_size, vision.temporal_patch_size
        channels = pixels.shape[-1] // (step * patch * patch)
        tiles, start = [], 0
        for item, (t, h, w) in enumerate(trace.grid):
            for k in range(t):
                units = pixels[start : start + h * w].reshape(h // m, w // m, m, m, channels, step, patch, patch)
                image = units[..., 0, :, :].permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * patch, w * patch)
                row = len(tiles)
                name = trace.modality if len(trace.grid) == 1 else f"{trace.modality} {item}"
                name += f", frame {k}" if t > 1 else ""
                cells = trace.steps[0].cells[row].tolist()
                orders = [s.order[row].tolist() for s in trace.steps]
                tiles.append(Tile(image, (h // m, w // m), row, name, cells, orders))
                start += h * w
        return tiles

    def image_key_map(self, handle: Handle, inputs: dict) -> list[tuple[int, int] | None]:
        """The LLM receives each frame's tokens in raster order of the grid cells they sit at (a kept unit's own, a
        merged unit's most important member's), the tower's output order sorted by cell; pads of the other
        modality (not in the last vision forward) hold no tile token."""
        tiles = self.vision_tiles(handle, inputs)
        last = self.trace.steps[-1]
        info = last.info
        source = torch.cat([info.kept_index, _representatives(info)], dim=1)  # (frames, k + c) stage input units
        emitted = last.cells.gather(1, source).gather(1, last.order)  # cell of each unit leaving the tower
        tokens = [(t.row, j) for t in tiles for j in torch.argsort(emitted[t.row], stable=True).tolist()]
        token_id = getattr(self.config, f"{self.trace.modality}_token_id")
        ids = inputs["input_ids"][0]
        media = ids[torch.isin(ids, torch.tensor(self.media_token_ids(), device=ids.device))].tolist()
        if sum(i == token_id for i in media) > len(tokens):
            raise ValueError(
                f"{self.family}: the prompt has more {self.trace.modality} tokens than the last vision forward sent."
            )
        keys, emitted_tokens = [], iter(tokens)
        for i in media:
            keys.append(next(emitted_tokens) if i == token_id else None)
        return keys

    def stage_blocks(self, handle: Handle) -> list[int]:
        if self.trace is None or not self.trace.uniform:
            return []
        return [self.budget.layers[step.stage] for step in self.trace.steps]

    # --- prompt and processor ----------------------------------------------------------------------------------
    def check_prompt(self, handle: Handle, input_ids, kwargs: dict) -> None:
        if not self.active:
            return
        self._last = {}
        encoded = kwargs.get("mm_encoder_outputs") or {}
        for modality, _, pixel_key, grid_key in MODALITIES:
            token = getattr(self.config, f"{modality}_token_id")
            if encoded.get(modality) is not None:  # generate() encoded them (and may have repeated them for beams)
                if hasattr(encoded[modality], "unclutter_layouts"):
                    self._last[modality] = encoded[modality].unclutter_layouts
                want, stock = sum(int(x.shape[0]) for x in encoded[modality].pooler_output), None
            elif kwargs.get(pixel_key) is not None and kwargs.get(grid_key) is not None:
                grid = kwargs[grid_key]
                units = (grid[:, 1] * grid[:, 2] // self.merge**2).tolist()
                want = sum(t * self.budget.tokens(u) for t, u in zip(grid[:, 0].tolist(), units, strict=True))
                stock = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()) // self.merge**2
            else:
                continue
            if input_ids is None:
                raise ValueError("VMTC on Qwen needs input_ids (not inputs_embeds) to place the compressed tokens.")
            if kwargs.get("mm_token_type_ids") is None and kwargs.get("position_ids") is None:
                raise ValueError(
                    "mm_token_type_ids is missing: without it Qwen silently falls back to 1-D positions. Pass the "
                    "processor's whole output (it returns mm_token_type_ids with the grids)."
                )
            found = int((input_ids == token).sum())
            if found == stock and stock != want:
                raise ValueError(
                    f"the prompt carries the stock {stock} {modality} tokens but VMTC sends {want}: pass processor= "
                    "to unclutter.apply so the processor expands each placeholder to the compressed count."
                )
            if found != want:
                raise ValueError(
                    f"the prompt has {found} {modality} tokens but the compressed {modality}s give {want}."
                )

    def patch_processor(self, handle: Handle, processor) -> None:
        """Expand each image / video frame to its compressed count (the processor's own expansion hooks)."""
        for name in ("replace_image_token", "replace_video_token", "image_token", "video_token", "image_processor"):
            if not hasattr(processor, name):
                raise TypeError(
                    f"processor must be a {self.family} processor (no `{name}`); got {type(processor).__name__}."
                )
        for sub in (processor.image_processor, getattr(processor, "video_processor", None)):
            if sub is not None and getattr(sub, "merge_size", self.merge) != self.merge:
                raise ValueError(
                    f"the processor merges {sub.merge_size}x{sub.merge_size} patches, the model {self.merge}."
                )
        tokens, unit = self.budget.tokens, self.merge**2
        original = {n: getattr(processor, n) for n in ("replace_image_token", "replace_video_token")}
        original_counts = processor._get_num_multimodal_tokens

        def shrink(text: str, token: str, units: int) -> str:
            def per_run(match: re.Match) -> str:  # a run of pads holds whole frames of `units` tokens
                frames, rest = divmod(len(match.group(0)) // len(token), units)
                if rest:
                    raise ValueError(f"a run of {token} does not hold whole frames of {units} tokens.")
                return token * (frames * tokens(units))

            return re.sub(f"(?:{re.escape(token)})+", per_run, text)

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            _, h, w = image_inputs["image_grid_thw"][image_idx].tolist()
            text = original["replace_image_token"](image_inputs, image_idx, **kwargs)
            return shrink(text, processor.image_token, h * w // unit)

        def replace_video_token(video_inputs: dict, video_idx: int, **kwargs) -> str:
            _, h, w = video_inputs["video_grid_thw"][video_idx].tolist()
            text = original["replace_video_token"](video_inputs, video_idx, **kwargs)
            return shrink(text, processor.video_token, h * w // unit)

        def get_num_multimodal_tokens(image_sizes=None, video_sizes=None, **kwargs):
            data = original_counts(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
            if image_sizes is not None:
                data.num_image_tokens = [tokens(p // unit) for p in data.num_image_patches]
            if video_sizes is not None:
                step = processor.video_processor.temporal_patch_size
                counts = []
                for (frames, _, _), stock in zip(video_sizes, data.num_video_tokens, strict=True):
                    t = -(-frames // step)
                    counts.append(t * tokens(stock // t))
                data.num_video_tokens = counts
            return data

        handle.override(processor, "replace_image_token", replace_image_token)
        handle.override(processor, "replace_video_token", replace_video_token)
        handle.override(processor, "_get_num_multimodal_tokens", get_num_multimodal_tokens)


def _encoded_layouts(modality: str, output) -> list[Layout]:
    """The cells each item of features encoded before the call kept (``mm_encoder_outputs``, e.g. precomputed with
    ``get_image_features``): theirs, not the last vision forward's, which may have been another image of that size."""
    layouts = getattr(output, "unclutter_layouts", None)
    if layouts is None:
        raise ValueError(
            f"mm_encoder_outputs['{modality}'] was not encoded by the compressed tower, so VMTC cannot place its "
            f"tokens: compute it with get_{modality}_features while unclutter is applied, or pass the pixels instead."
        )
    return layouts


def _stock_grid(layout: Layout, merge: int) -> list[int]:
    t, h, w = layout.grid
    return [t, h * merge, w * merge]


def compressed_rope_index(
    stock, input_ids, mm_token_type_ids, attention_mask, entries: dict, image_grid_thw, video_grid_thw, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock `get_rope_index` on the prompt re-expanded to stock length, then the emitted cells' positions.

    entries: per modality type id (1 image, 2 video), one ``(emitted, stock, cells)`` per run of pads in prompt
    order: the run's compressed and stock lengths and the emitted cells' index within the stock run.
    Returns position ids (3, B, L) and rope deltas (B, 1) for the compressed prompt.
    """
    bsz, length = input_ids.shape
    device = input_ids.device
    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    runs = {t: iter(v) for t, v in entries.items()}
    rows = []  # per sample: expanded ids, types, valid; and where each compressed token sits in the expanded row
    for b in range(bsz):
        types = mm_token_type_ids[b]
        change = torch.nonzero(types[1:] != types[:-1]).flatten().add(1).tolist()
        bounds = [0, *change, length]
        pieces, where, pos = [], [], 0
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            kind = int(types[s])
            if kind == 0:  # text (and padding): as it is
                pieces.append((input_ids[b, s:e], types[s:e], mask[b, s:e]))
                where.append(pos + torch.arange(e - s, device=device))
                pos += e - s
                continue
            try:
                emitted, stock_len, cells = next(runs[kind])
            except (KeyError, StopIteration):
                raise ValueError(f"the prompt has more runs of modality {kind} than encoded items.") from None
            if emitted != e - s or not bool(mask[b, s:e].all()):
                raise ValueError(
                    f"a run of {e - s} {'image' if kind == 1 else 'video'} tokens does not match its compressed count "
                    f"{emitted}: expand placeholders with the processor passed to unclutter.apply."
                )
            full = torch.ones(stock_len, dtype=torch.bool, device=device)  # the run at its stock length
            pieces.append((input_ids[b, s].expand(stock_len), types[s].expand(stock_len), full))
            where.append(pos + cells.to(device))
            pos += stock_len
        rows.append((*(torch.cat(column) for column in zip(*pieces, strict=True)), torch.cat(where)))
    if any(next(it, None) is not None for it in runs.values()):
        raise ValueError("more images/videos were encoded than the prompt has placeholder runs for.")
    width = max(r[0].numel() for r in rows)
    ids = input_ids.new_zeros(bsz, width)
    kinds = mm_token_type_ids.new_zeros(bsz, width)
    valid = torch.zeros(bsz, width, dtype=torch.bool, device=device)
    where = []
    for b, (i, k, v, w) in enumerate(rows):  # left-pad the expanded rows, like the prompt
        pad = width - i.numel()
        ids[b, pad:], kinds[b, pad:], valid[b, pad:] = i, k, v
        where.append(w + pad)
    expanded, _ = stock(
        ids, mm_token_type_ids=kinds, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
        attention_mask=valid.long(), **kwargs,
    )  # fmt: skip
    positions = torch.stack([expanded[:, b, w] for b, w in enumerate(where)], dim=1)
    positions = positions.masked_fill(~mask[None], 0)  # padding stays at 0, as in the stock function
    top = positions.masked_fill(~mask[None], torch.iinfo(positions.dtype).min).amax(dim=(0, 2))
    deltas = (top + 1 - mask.sum(dim=1)).unsqueeze(1)
    return positions, deltas
