"""Qwen3-VL (`Qwen3VLForConditionalGeneration` / `Qwen3VLModel`): full attention everywhere, DeepStack features.

Every vision block attends over whole frames, so default stages are equally spaced over all blocks (as for
LLaVA). DeepStack: the hidden states after each `deepstack_visual_indexes` block are captured and every later
stage applies its own keep/merge to them (same kept units, same clusters, same importance weights; `replay`), so
the DeepStack features added to the LLM's first layers line up with the compressed image tokens; each DeepStack
merger then sees whole (kept or merged) units, like the main merger. Videos: the processor writes one
``<t seconds><|vision_start|>...<|vision_end|>`` block per frame, and each frame is compressed to its own budget.
"""

from __future__ import annotations

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    BaseModelOutputWithDeepstackFeatures,
    apply_rotary_pos_emb_vision,
)
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

from .base import register
from .qwen_vl import Packed, QwenVLAdapter


@register
class Qwen3VLAdapter(QwenVLAdapter):
    family = "Qwen3-VL"
    classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    processor_classes = ("Qwen3VLProcessor",)
    output_class = BaseModelOutputWithDeepstackFeatures
    rotary = staticmethod(apply_rotary_pos_emb_vision)
    video_run_per_frame = True

    def run_tower(self, pixels: torch.Tensor, grid: torch.Tensor):
        visual = self.base.visual
        merge = visual.spatial_merge_size
        taps, weights = get_vision_interpolation_indices_and_weights(
            grid,
            num_grid_per_side=visual.num_grid_per_side,
            mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners,
            spatial_merge_size=merge,
        )
        h = visual.patch_embed(pixels)
        h = h + (visual.pos_embed(taps) * weights[:, :, None]).sum(1).to(h.dtype)
        embeddings = visual.rotary_pos_emb(h, get_vision_position_ids(grid, merge))
        units = h.shape[0] // visual.spatial_merge_unit
        packed = Packed(grid, merge, torch.arange(units, device=h.device), None)
        layers = list(visual.deepstack_visual_indexes)
        h, captures = self.run_blocks(h, embeddings, packed, set(range(len(visual.blocks))), capture_at=layers)
        deepstack = [visual.deepstack_merger_list[j](c) for j, c in enumerate(captures)]
        return h, visual.merger(h), packed, deepstack
