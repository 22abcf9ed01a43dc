"""Gemma 3 (`Gemma3ForConditionalGeneration` / `Gemma3Model`): SigLIP without CLS, then a pooling projector.

The real model: 896 px, patch 14 -> a 64x64 patch grid; `Gemma3MultiModalProjector` average-pools 4x4
patches -> 16x16 = 256 soft tokens per image (per pan-and-scan crop), wrapped in ``<start_of_image>`` /
``<end_of_image>`` by the processor. The LLM mixes sliding-window and full-attention layers, and image
soft tokens attend bidirectionally within their image (the mask transformers builds from ``token_type_ids``).

- CMAI: the shared runtime. Image keys are the soft tokens (``config.image_token_id``, not the processor's
  ``<start_of_image>``); begin/end-of-image markers are structural. Gemma3Model builds every layer's mask
  (sliding window, bidirectional image blocks, padding) with ``create_causal_mask`` under the language
  model's attn_implementation, i.e. through CMAI's registered mask function, so CMAI edits the real mask.
- VMTC: the projector pools fixed ``k x k`` patch units (k = patches_per_image // tokens_per_side), so VMTC
  ranks, keeps and clusters whole units: each stage block views its (B, units*k*k, D) tokens as
  (B, units, k*k*D), ranks units by the mean "received" importance of their patches (no CLS) and merges
  redundant units by importance weight. The first active stage reorders the raster patches unit by unit
  (later blocks are permutation-equivariant); the projector then pools each unit with its own AvgPool2d
  (bit-identical to its stock pooling) and applies its norm and projection: exactly the budgeted count.
- SPD: the stock soft tokens (the ``tokens_per_side`` grid after the projector's pooling) are average-pooled to
  ``grid x grid`` before the norm and projection, as every family pools its grid of LLM tokens.
- Processor: each image (crop) expands to the compressed count through `replace_image_token`, the
  processor's own expansion hook (pan-and-scan wording kept), and `_get_num_multimodal_tokens`.
"""

from __future__ import annotations

import dataclasses
from types import MethodType

import torch
from torch import nn

from .. import vmtc as vmtc_math
from .base import Adapter, Handle, check_placeholders, encoded_rows, register
from .llava import num_images
from .vision import VMTCStage, plan_vmtc, pool_grid, rank_in_attention, record, stage_importance, want_ranking


def to_units(patches: torch.Tensor, side: int, kernel: int) -> torch.Tensor:
    """(B, side*side, D) raster patches -> (B, side*side, D) grouped by pooling unit.

    Unit ``i * (side // kernel) + j`` (the projector's output order) holds its ``kernel x kernel`` patches
    in row-major order, contiguously.
    """
    b, p, d = patches.shape
    if p != side * side:
        raise ValueError(f"Gemma 3 VMTC expected a {side}x{side} patch grid ({side * side} patches), got {p}.")
    t = side // kernel
    return patches.reshape(b, t, kernel, t, kernel, d).permute(0, 1, 3, 2, 4, 5).reshape(b, p, d)


def pool_units(projector: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, n*k*k, D) unit-grouped patches -> (B, n, D): each unit's mean, by the projector's own AvgPool2d.

    Units are laid side by side as a (k, n*k) image, so every pooling window is one unit, summed in the
    same order as the stock (side, side) grid: for uncompressed units this equals the stock pooling bit for bit.
    """
    b, t, d = tokens.shape
    k = projector.kernel_size
    n = t // (k * k)
    row = tokens.reshape(b, n, k, k, d).permute(0, 4, 2, 1, 3).reshape(b, d, k, n * k)
    return projector.avg_pool(row).flatten(2).transpose(1, 2)


def pool_stock(projector: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """(B, side*side, D) row-major patches -> (B, tokens_side**2, D): the projector's own pooling, the stock soft
    tokens before their norm."""
    b, _, d = patches.shape
    side = projector.patches_per_image
    square = patches.transpose(1, 2).reshape(b, d, side, side).contiguous()
    return projector.avg_pool(square).flatten(2).transpose(1, 2)


def project(projector: nn.Module, pooled: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The projector's steps after pooling: soft-embedding norm, then the projection into the LLM."""
    normed = projector.mm_soft_emb_norm(pooled)
    return torch.matmul(normed, projector.mm_input_projection_weight).type_as(like)


def unit_stage_forward(stage: VMTCStage, handle: Handle, side: int, kernel: int, first: bool):
    """SigLIP encoder-layer forward with VMTC on whole pooling units between attention and MLP (paper Fig. 3).

    The stage's counts are in units; its `VMTCInfo` (``handle.stage_infos``) indexes units of its input.
    """
    unit = kernel * kernel
    patch_stage = dataclasses.replace(stage, tokens_in=stage.tokens_in * unit)  # what the block sees, in patches

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("VMTC cannot compress a vision tower called with an attention mask.")
        if first:  # group each unit's patches; every block from here on is permutation-equivariant
            hidden_states = to_units(hidden_states, side, kernel)
        residual = hidden_states
        want_ranking(handle, stage.layer)
        hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=None, **kwargs)
        hidden_states = residual + hidden_states
        b, t, d = hidden_states.shape
        importance = stage_importance(handle, patch_stage, self.self_attn, t, has_cls=False)  # (B, units*u)
        units = importance.view(b, stage.tokens_in, unit).mean(dim=-1)  # (B, units): mean over each unit's patches
        cfg = handle.vmtc
        merged, info = vmtc_math.compress(
            hidden_states.reshape(b, stage.tokens_in, unit * d), units, stage.keep, stage.clusters,
            merge=cfg.merge, normalize=cfg.normalize, iters=cfg.kmeans_iters, has_cls=False,
        )  # fmt: skip
        record(handle, stage, info)
        hidden_states = merged.view(b, stage.tokens_out * unit, d)
        residual = hidden_states
        hidden_states = self.mlp(self.layer_norm2(hidden_states))
        return residual + hidden_states

    return forward


@register
class Gemma3Adapter(Adapter):
    family = "Gemma 3"
    classes = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    processor_classes = ("Gemma3Processor",)
    vmtc = True
    spd = True
    default_importance = "received"  # SigLIP has no CLS token

    def structural_token_ids(self) -> list[int]:
        """``<start_of_image>`` / ``<end_of_image>``: markers, neither image content nor the user's text."""
        return [self.config.boi_token_id, self.config.eoi_token_id]

    @property
    def projector(self) -> nn.Module:
        return self.base.multi_modal_projector

    def geometry(self) -> tuple[int, int, int]:
        """(patch grid side, pooled grid side, pooling kernel), checked against the projector's own layout."""
        proj = self.projector
        side, tokens_side, kernel = proj.patches_per_image, proj.tokens_per_side, proj.kernel_size
        if tokens_side * tokens_side != self.config.mm_tokens_per_image or kernel * tokens_side != side:
            raise ValueError(
                f"Gemma 3's projector pools a {side}x{side} patch grid with kernel {kernel} to {tokens_side}x"
                f"{tokens_side}, which does not give mm_tokens_per_image={self.config.mm_tokens_per_image} exactly; "
                "unclutter cannot reduce tokens on this config."
            )
        return side, tokens_side, kernel

    def plan(self, handle: Handle) -> None:
        if getattr(self.config.get_text_config(), "use_bidirectional_attention", False) and handle.cmai is not None:
            raise NotImplementedError(
                "CMAI needs a causal language model (Eq. 10 sums over earlier text tokens); this Gemma 3 config sets "
                "use_bidirectional_attention=True."
            )
        handle.stock_image_tokens = handle.num_image_tokens = self.config.mm_tokens_per_image
        if handle.vmtc is None and handle.spd is None:
            return
        _, tokens_side, _ = self.geometry()
        if handle.vmtc is not None:
            tower = self.base.vision_tower
            if not hasattr(tower, "encoder") or not hasattr(tower.encoder, "layers"):
                raise TypeError(f"VMTC needs a SigLIP vision tower with encoder.layers; got {type(tower).__name__}.")
            if handle.importance != "received":
                raise ValueError("Gemma 3's SigLIP tower has no CLS token: use VMTCConfig(importance='received').")
            blocks = self.config.vision_config.num_hidden_layers  # the projector reads the last block's output
            handle.stages = plan_vmtc(handle.vmtc, tokens_side * tokens_side, blocks - 1)
            handle.num_image_tokens = handle.stages[-1].tokens_out
        if handle.spd is not None:
            if handle.spd.grid > tokens_side:
                raise ValueError(
                    f"SPD grid {handle.spd.grid} is finer than Gemma 3's {tokens_side}x{tokens_side} soft-token grid: "
                    f"choose grid <= {tokens_side}."
                )
            handle.num_image_tokens = handle.spd.grid**2

    def install(self, handle: Handle) -> None:
        if not handle.active_stages and handle.spd is None:
            return  # CMAI only, or VMTC at ratio 1.0: the vision side stays stock
        side, _, kernel = self.geometry()
        for i, stage in enumerate(handle.active_stages):
            block = self.base.vision_tower.encoder.layers[stage.layer]
            missing = [name for name in ("layer_norm1", "self_attn", "layer_norm2", "mlp") if not hasattr(block, name)]
            if missing:
                raise TypeError(
                    f"VMTC expects SigLIP's pre-norm encoder layer; {type(block).__name__} lacks {', '.join(missing)}."
                )
            rank_in_attention(handle, self.base.vision_tower, block.self_attn, stage.layer)
            forward = unit_stage_forward(stage, handle, side, kernel, first=i == 0)
            handle.patch_forward(block, MethodType(forward, block))
        if handle.active_stages:
            units = handle.num_image_tokens

            def projector_forward(self, vision_outputs: torch.Tensor) -> torch.Tensor:
                if vision_outputs.shape[1] != units * kernel * kernel:
                    raise ValueError(
                        f"Gemma 3's projector got {vision_outputs.shape[1]} vision tokens but VMTC should deliver "
                        f"{units} units of {kernel}x{kernel} patches: the vision tower was not run through VMTC."
                    )
                return project(self, pool_units(self, vision_outputs), vision_outputs)

            handle.patch_forward(self.projector, MethodType(projector_forward, self.projector))
        if handle.spd is not None:
            grid = handle.spd.grid

            def spd_forward(self, vision_outputs: torch.Tensor) -> torch.Tensor:  # stock's soft tokens, pooled
                return project(self, pool_grid(pool_stock(self, vision_outputs), grid), vision_outputs)

            handle.patch_forward(self.projector, MethodType(spd_forward, self.projector))

    def patch_processor(self, handle: Handle, processor) -> None:
        tokenizer = getattr(processor, "tokenizer", None)
        if not hasattr(processor, "replace_image_token") or getattr(tokenizer, "image_token", None) is None:
            raise TypeError(f"processor must be a Gemma3Processor, got {type(processor).__name__}.")
        stock, tokens = handle.stock_image_tokens, handle.num_image_tokens
        if getattr(processor, "image_seq_length", None) != stock:
            raise ValueError(
                f"the processor expands each image to {getattr(processor, 'image_seq_length', None)} soft tokens but "
                f"the model's config has mm_tokens_per_image={stock}: processor and model do not belong together."
            )
        stock_run, new_run = tokenizer.image_token * stock, tokenizer.image_token * tokens
        original_replace, original_counts = processor.replace_image_token, processor._get_num_multimodal_tokens

        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
            text = original_replace(image_inputs, image_idx, **kwargs)
            crops = image_inputs["num_crops"][image_idx] if "num_crops" in image_inputs else 0
            if text.count(tokenizer.image_token) != stock * (1 + int(crops)):
                raise ValueError(
                    f"Gemma3Processor.replace_image_token returned {text.count(tokenizer.image_token)} soft tokens for "
                    f"an image with {int(crops)} crops; unclutter expects {stock} per crop (transformers changed?)."
                )
            return text.replace(stock_run, new_run)

        def get_num_multimodal_tokens(image_sizes=None, **kwargs):
            data = original_counts(image_sizes=image_sizes, **kwargs)  # a MultiModalData dataclass
            if image_sizes is None:
                return data
            return dataclasses.replace(data, num_image_tokens=[tokens] * len(image_sizes))

        handle.override(processor, "replace_image_token", replace_image_token)
        handle.override(processor, "_get_num_multimodal_tokens", get_num_multimodal_tokens)

    def check_prompt(self, handle: Handle, input_ids, kwargs: dict) -> None:
        check_placeholders(handle, input_ids, num_images(kwargs), self.config.image_token_id, encoded_rows(kwargs))
