"""Shared vision-side pieces: VMTC stage planning, a VMTC encoder-layer forward, ranking, and SPD pooling.

Every adapter whose tower is built from pre-norm ViT layers (CLIP, SigLIP: ``layer_norm1 ->
self_attn -> residual -> layer_norm2 -> mlp -> residual``) uses `vmtc_layer_forward`; towers with
another layer layout write their own forward around the same pure functions of `unclutter.vmtc`.

Ranking. A stage block ranks its patches from the queries and keys its own attention computes. CLS
ranking reads them from the q/k projections (`capture_qk`: one query row, cheap). "Received" ranking
needs every query row, i.e. the block's whole attention map: on an SDPA tower (SigLIP without padding:
Gemma 3, LLaVA-OneVision) `rank_in_attention` registers `vmtc_attention` with transformers'
`AttentionInterface` for the tower, which is plain SDPA in every block except a stage block that asks
for its ranking, where one chunked pass gives both the attention output and the importance
(`vmtc.attention_with_received`). Elsewhere (eager towers, padding masks) the importance is a second
score pass over the captured q/k.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .. import vmtc as vmtc_math
from ..config import VMTCConfig

DEFAULT_STAGES = 4
VISION_ATTN = "unclutter_vmtc"  # the vision tower's registered attention function while a stage ranks in it


@dataclass
class VMTCStage:
    """One compression step: where it sits and how many tokens it keeps and makes."""

    layer: int
    tokens_in: int  # patch tokens entering (CLS excluded)
    keep: int
    clusters: int

    @property
    def tokens_out(self) -> int:
        return self.keep + self.clusters

    @property
    def identity(self) -> bool:
        """Keeps every token: such a stage changes nothing and is not installed."""
        return self.keep == self.tokens_in


def plan_vmtc(cfg: VMTCConfig, num_patches: int, feature_block: int, *, cap_clusters: bool = False) -> list[VMTCStage]:
    """Resolve a `VMTCConfig` into stages for a tower with ``num_patches`` patches (per image or tile).

    cap_clusters: a stage's explicit ``clusters`` above its output count is lowered to that count instead of
    refused (families whose images have different sizes: one setting for all, as ``num_tokens`` is capped)."""
    budget = cfg.num_tokens if cfg.num_tokens is not None else max(1, round(cfg.ratio * num_patches))
    if not 1 <= budget <= num_patches:
        raise ValueError(
            f"VMTC token budget {budget} is impossible for {num_patches} patches: choose num_tokens in "
            f"[1, {num_patches}] or ratio in (0, 1]."
        )
    n_stages = cfg.num_stages if cfg.num_stages is not None else min(DEFAULT_STAGES, feature_block + 1)
    layers = list(cfg.layers) if cfg.layers is not None else vmtc_math.stage_layers(feature_block, n_stages)
    if layers[-1] > feature_block or layers[0] < 0:
        raise ValueError(
            f"VMTC layers {layers} must lie in [0, {feature_block}]: blocks after the feature layer never "
            "reach the LLM (and a stage between two feature layers would break their concatenation)."
        )
    counts = (
        list(cfg.stage_tokens)
        if cfg.stage_tokens is not None
        else vmtc_math.stage_token_counts(num_patches, budget, len(layers))
    )
    if len(counts) != len(layers) or counts[-1] != budget:
        raise ValueError(
            f"VMTCConfig.stage_tokens={counts} must give one count per stage ({len(layers)}) ending at the budget {budget}."
        )
    if isinstance(cfg.clusters, tuple) and len(cfg.clusters) != len(layers):
        raise ValueError(f"VMTCConfig.clusters has {len(cfg.clusters)} values for {len(layers)} stages.")
    stages, tokens_in = [], num_patches
    for i, (layer, tokens_out) in enumerate(zip(layers, counts, strict=True)):
        if not 1 <= tokens_out <= tokens_in:
            raise ValueError(
                f"VMTC stage {i} (block {layer}) cannot go from {tokens_in} to {tokens_out} tokens: counts must "
                "be non-increasing and >= 1."
            )
        if tokens_out == tokens_in:
            c = 0  # nothing to remove: keep every token, in order (ratio 1.0 is the stock model)
        elif cfg.merge == "drop":
            c = 0
        elif cfg.merge == "single":
            c = 1
        elif cfg.clusters is None:
            c = vmtc_math.default_clusters(tokens_out)
        else:
            c = cfg.clusters if isinstance(cfg.clusters, int) else cfg.clusters[i]
        if cap_clusters:
            c = min(c, tokens_out)
        if c > tokens_out or c < 0:  # (c = 0 only for an identity stage or merge="drop"; VMTCConfig checks clusters)
            raise ValueError(f"VMTC stage {i} wants {c} clusters but outputs only {tokens_out} tokens; lower clusters.")
        stages.append(VMTCStage(layer=layer, tokens_in=tokens_in, keep=tokens_out - c, clusters=c))
        tokens_in = tokens_out
    return stages


def capture_qk(handle, attn: nn.Module, layer: int, names: tuple[str, str] = ("q_proj", "k_proj")) -> None:
    """Keep the outputs of the block's query and key projections for the VMTC forward (no second pass).

    The projections are looked up at every call of ``attn``: a wrapper installed after `apply` (PEFT's LoRA layers
    replace ``q_proj`` by a module that calls the original) is then the module whose output is kept, LoRA term
    included, not the original inside it."""
    hooked: dict[str, tuple[nn.Module, Any]] = {}  # "q" / "k" -> (projection module, its hook handle)

    def follow(module, args) -> None:
        for short, name in zip(("q", "k"), names, strict=True):
            proj = getattr(attn, name)
            if short in hooked and hooked[short][0] is proj:
                continue
            if short in hooked:
                hooked[short][1].remove()

            def grab(module, args, output, short=short):
                handle._qk.setdefault(layer, {})[short] = output

            hooked[short] = (proj, proj.register_forward_hook(grab))

    follow(attn, ())
    handle.add_hook(attn.register_forward_pre_hook(follow))
    handle._undo.append(lambda: [hook.remove() for _, hook in hooked.values()])


class RankingSlot:
    """Between a stage block's forward and its attention call: whether the ranking is wanted, and its result."""

    def __init__(self) -> None:
        self.wanted = False
        self.importance: torch.Tensor | None = None


def vmtc_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA, except in a stage block that asked for its ranking (`want_ranking`): then the attention output and the
    received importance from one pass over the scores, the importance left in the block's `RankingSlot`."""
    slot = getattr(module, "_unclutter_ranking", None)
    if slot is None or not slot.wanted:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    slot.wanted = False
    if attention_mask is not None or (dropout and module.training) or query.shape[1] != key.shape[1]:
        raise ValueError(
            "unclutter ranks a VMTC stage inside its attention only without an attention mask, dropout or grouped "
            f"heads; {type(module).__name__} got one. Load the vision tower with attn_implementation='eager' to rank "
            "from captured queries and keys instead."
        )
    scale = module.scale if scaling is None else scaling
    out, slot.importance = vmtc_math.attention_with_received(query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


def rank_in_attention(handle, tower: nn.Module, attn: nn.Module, layer: int) -> None:
    """Let stage block ``layer`` rank its patches: inside its own attention on an SDPA tower with received
    importance (see the module docstring), else from its captured q/k projections (`capture_qk`)."""
    impl = getattr(tower.config, "_attn_implementation", None)
    if handle.importance != "received" or impl not in ("sdpa", VISION_ATTN):
        capture_qk(handle, attn, layer)
        return
    if impl == "sdpa":
        AttentionInterface.register(VISION_ATTN, vmtc_attention)
        tower.set_attn_implementation(VISION_ATTN)
        # (a user who switched the tower's implementation after apply keeps that choice)
        handle._undo.append(
            lambda: tower.config._attn_implementation == VISION_ATTN and tower.set_attn_implementation("sdpa")
        )
    slot = RankingSlot()
    handle.override(attn, "_unclutter_ranking", slot)
    handle._ranked[layer] = slot


def tower_impl(attn: nn.Module) -> str | None:
    config = getattr(attn, "config", None)
    return getattr(config, "_attn_implementation", None)


def want_ranking(handle, layer: int) -> None:
    """Before a stage block's attention call: ask for the ranking (a no-op when it comes from captured q/k)."""
    slot = handle._ranked.get(layer)
    if slot is not None:
        slot.wanted, slot.importance = True, None


def stage_importance(
    handle, stage: VMTCStage, attn: nn.Module, tokens: int, *, has_cls: bool = True, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, N) importance of the stage block's patches, from the q/k it just computed (float32).

    "cls" (the paper): the CLS query's attention to each patch; "received": the mean attention each token
    receives from all tokens (``handle.importance``; towers without CLS). ``valid``: (B, T) patch mask.
    """
    slot = handle._ranked.get(stage.layer)
    if slot is not None:  # ranked inside the block's attention (`rank_in_attention`)
        importance, slot.importance, slot.wanted = slot.importance, None, False
        if importance is None:
            raise RuntimeError(
                f"VMTC stage at block {stage.layer}: the block's attention did not run through unclutter's registered "
                f"attention function (the tower's attn_implementation is {tower_impl(attn)!r}: if you changed it after "
                "unclutter.apply, remove() first and apply again; else transformers changed how the tower dispatches "
                "attention); cannot rank patches."
            )
        if has_cls or valid is not None or importance.shape[1] != tokens or tokens != stage.tokens_in:
            raise ValueError(
                f"VMTC stage at block {stage.layer} expected {stage.tokens_in} patch tokens without CLS or padding, got "
                f"{importance.shape[1]}: the image size does not match the vision config."
            )
        return importance
    grab = handle._qk.pop(stage.layer, None)
    if grab is None or "q" not in grab or "k" not in grab:
        raise RuntimeError(
            f"VMTC stage at block {stage.layer}: the block's q/k projections did not run (the tower's attention "
            "module changed?); cannot rank patches."
        )
    b, t, _ = grab["q"].shape
    lead = 1 if has_cls else 0
    if t - lead != stage.tokens_in or tokens != t:
        raise ValueError(
            f"VMTC stage at block {stage.layer} expected {stage.tokens_in} patch tokens, got {t - lead}: the image "
            "size does not match the vision config."
        )
    heads = attn.num_heads
    head_dim = grab["q"].shape[-1] // heads
    q = grab["q"].view(b, t, heads, head_dim).transpose(1, 2)
    k = grab["k"].view(b, t, heads, head_dim).transpose(1, 2)
    if handle.importance == "received":
        received = vmtc_math.received_importance(q, k, attn.scale, valid=valid)
        return received[:, lead:]
    if not has_cls:
        raise ValueError("importance='cls' needs a CLS token; this tower has none (use importance='received').")
    return vmtc_math.cls_importance(q[:, :, :1], k, attn.scale)


def record(handle, stage: VMTCStage, info: vmtc_math.VMTCInfo) -> None:
    """Keep one `VMTCInfo` per stage of the last vision forward (for pictures and tests)."""
    if stage is handle.active_stages[0]:
        handle.stage_infos = []
    handle.stage_infos.append(info)


def vmtc_layer_forward(stage: VMTCStage, handle):
    """A pre-norm ViT encoder-layer forward (CLIP, SigLIP) with VMTC between attention and MLP (paper Fig. 3)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("VMTC cannot compress a vision tower called with an attention mask.")
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=None, **kwargs)
        hidden_states = residual + hidden_states
        importance = stage_importance(handle, stage, self.self_attn, hidden_states.shape[1])
        cfg = handle.vmtc
        # both run with autocast off themselves: float32 ranking and merging even under bf16 mixed precision
        hidden_states, info = vmtc_math.compress(
            hidden_states, importance, stage.keep, stage.clusters,
            merge=cfg.merge, normalize=cfg.normalize, iters=cfg.kmeans_iters,
        )  # fmt: skip
        record(handle, stage, info)
        residual = hidden_states
        hidden_states = self.mlp(self.layer_norm2(hidden_states))
        return residual + hidden_states

    return forward


def install_vmtc_layers(handle, layers: nn.ModuleList) -> None:
    """Give each non-identity stage block the VMTC forward and q/k capture (CLIP/SigLIP layer layout)."""
    for stage in handle.active_stages:
        block = layers[stage.layer]
        capture_qk(handle, block.self_attn, stage.layer)
        handle.patch_forward(block, MethodType(vmtc_layer_forward(stage, handle), block))


def pool_grid(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """SPD: average-pool (B, side*side, E) square patch grids to (B, grid*grid, E), in float32."""
    b, p, e = patches.shape
    side = int(round(p**0.5))
    if side * side != p:
        raise ValueError(f"SPD needs a square patch grid, got {p} patches.")
    if grid > side:
        raise ValueError(f"SPD grid {grid} is larger than the {side}x{side} patch grid: choose grid <= {side}.")
    square = patches.transpose(1, 2).reshape(b, e, side, side)
    return F.adaptive_avg_pool2d(square.float(), grid).to(patches.dtype).flatten(2).transpose(1, 2)
