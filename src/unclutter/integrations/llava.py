"""LLaVA-1.5 (`LlavaForConditionalGeneration` / `LlavaModel`): CLIP tower with CLS, one fixed grid per image.

- VMTC: each stage block of the CLIP tower gets the shared VMTC layer forward (`vision.py`).
- SPD: a forward pre-hook on the projector average-pools the patch grid.
- Processor: ``<image>`` expands to the compressed count (`replace_image_token`, the processor's own
  expansion hook, and `_get_num_multimodal_tokens`, which serving code uses to count).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import vmtc as vmtc_math
from .base import Adapter, Handle, check_placeholders, encoded_rows, register
from .vision import install_vmtc_layers, plan_vmtc, pool_grid


def num_images(kwargs: dict) -> int:
    """Images in this forward call's pixel_values (features encoded before the call: `encoded_rows`)."""
    pixels = kwargs.get("pixel_values")
    return pixels.shape[0] if pixels is not None else 0


def feature_block(config) -> int:
    """0-based block whose output feeds the projector (the smallest, when several layers are concatenated)."""
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    return min(vmtc_math.feature_block(config.vision_config.num_hidden_layers, f) for f in layers)


def fixed_count_processor(handle: Handle, processor, tokens: int) -> None:
    """Expand each image placeholder to ``tokens`` image tokens (processors with one count per image)."""
    if not hasattr(processor, "replace_image_token") or not hasattr(processor, "image_token"):
        raise TypeError(
            f"processor must be a LLaVA processor (with image_token and replace_image_token), got "
            f"{type(processor).__name__}."
        )
    original_counts = processor._get_num_multimodal_tokens

    def replace_image_token(image_inputs: dict, image_idx: int, **kwargs) -> str:
        return processor.image_token * tokens

    def get_num_multimodal_tokens(image_sizes=None, **kwargs):
        data = original_counts(image_sizes=image_sizes, **kwargs)  # a MultiModalData dataclass
        if image_sizes is not None:
            data = dataclasses.replace(data, num_image_tokens=[tokens] * len(image_sizes))
        return data

    handle.override(processor, "replace_image_token", replace_image_token)
    handle.override(processor, "_get_num_multimodal_tokens", get_num_multimodal_tokens)


@register
class LlavaAdapter(Adapter):
    family = "LLaVA-1.5"
    classes = ("LlavaForConditionalGeneration", "LlavaModel")
    processor_classes = ("LlavaProcessor",)
    vmtc = True
    spd = True

    @property
    def grid(self) -> int:
        vcfg = self.config.vision_config
        return vcfg.image_size // vcfg.patch_size

    @property
    def extra(self) -> int:
        """1 when the CLS token reaches the LLM too (vision_feature_select_strategy 'full')."""
        return 1 if self.config.vision_feature_select_strategy == "full" else 0

    def plan(self, handle: Handle) -> None:
        patches = self.grid * self.grid
        handle.stock_image_tokens = handle.num_image_tokens = patches + self.extra
        if handle.vmtc is not None:
            tower = self.base.vision_tower
            if not hasattr(tower, "encoder") or not hasattr(tower.embeddings, "class_embedding"):
                raise TypeError(
                    f"VMTC needs a ViT vision tower with a CLS token (CLIP); this model's {type(tower).__name__} has none."
                )
            handle.stages = plan_vmtc(handle.vmtc, patches, feature_block(self.config))
            handle.num_image_tokens = handle.stages[-1].tokens_out + self.extra
        if handle.spd is not None:
            if handle.spd.grid > self.grid:
                raise ValueError(
                    f"SPD grid {handle.spd.grid} is larger than the {self.grid}x{self.grid} patch grid: choose grid <= "
                    f"{self.grid}."
                )
            handle.num_image_tokens = handle.spd.grid**2 + self.extra

    def install(self, handle: Handle) -> None:
        install_vmtc_layers(handle, self.base.vision_tower.encoder.layers)
        if handle.spd is not None:
            grid, has_cls = handle.spd.grid, bool(self.extra)

            def pool(module, args: tuple):
                features = args[0]  # (B, [1+]P, E)
                pooled = pool_grid(features[:, 1:] if has_cls else features, grid)
                return (torch.cat([features[:, :1], pooled], dim=1) if has_cls else pooled,) + args[1:]

            handle.add_hook(self.base.multi_modal_projector.register_forward_pre_hook(pool))

    def patch_processor(self, handle: Handle, processor) -> None:
        fixed_count_processor(handle, processor, handle.num_image_tokens)

    def check_prompt(self, handle: Handle, input_ids, kwargs: dict) -> None:
        check_placeholders(handle, input_ids, num_images(kwargs), self.config.image_token_id, encoded_rows(kwargs))

    def image_key_map(self, handle: Handle, inputs: dict) -> list[tuple[int, int] | None]:
        """One tile; with feature selection "full" the CLS token reaches the LLM first (it holds no patch)."""
        return [None] * self.extra + [(0, j) for j in range(handle.num_image_tokens - self.extra)]
