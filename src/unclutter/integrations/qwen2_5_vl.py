"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration` / `Qwen2_5_VLModel`): the tower with window attention.

The stock tower reorders merge units window by window, runs blocks in `fullatt_block_indexes` over whole frames
and the others within windows, merges units and restores raster order. With VMTC (shared logic in `qwen_vl.py`)
stages sit on the full-attention blocks by default (`Qwen/Qwen2.5-VL-7B-Instruct`: 7, 15, 23, 31, four stages),
each frame ranked within itself; a windowed block after a stage attends within the windows of the units that are
left (a merged unit belongs to its most important member's window), so windows keep their meaning and the
compressed tower is exact to define.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from .base import register
from .qwen_vl import Packed, QwenVLAdapter


@register
class Qwen2_5_VLAdapter(QwenVLAdapter):
    family = "Qwen2.5-VL"
    classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    processor_classes = ("Qwen2_5_VLProcessor",)
    output_class = BaseModelOutputWithPooling
    rotary = staticmethod(apply_rotary_pos_emb_vision)

    def candidate_layers(self) -> list[int]:
        return sorted(self.config.vision_config.fullatt_block_indexes)

    def run_tower(self, pixels: torch.Tensor, grid: torch.Tensor):
        visual = self.base.visual
        merge, unit = visual.spatial_merge_size, visual.spatial_merge_unit
        positions = get_vision_position_ids(grid, merge)
        window_index, cu_windows = get_vision_window_index(grid, merge, visual.window_size, visual.patch_size)
        h = visual.patch_embed(pixels)
        n = h.shape[0]
        h = visual.permute_input_for_window_attn(h, window_index, seq_len=n)
        embeddings = visual.rotary_pos_emb(h, positions)
        embeddings = tuple(visual.permute_input_for_window_attn(e, window_index, seq_len=n) for e in embeddings)
        # the window of each unit (tower order): how many windows end at or before it
        bounds = cu_windows[1:].to(h.device).long() // unit
        window = torch.searchsorted(bounds, torch.arange(n // unit, device=h.device), right=True)
        packed = Packed(grid, merge, window_index.to(h.device), window)
        h, _ = self.run_blocks(h, embeddings, packed, set(visual.fullatt_block_indexes))
        return h, visual.merger(h), packed, None
