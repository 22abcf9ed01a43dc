"""A tiny random Qwen3-VL (`Qwen3VLForConditionalGeneration`) and its processor, built from configs only.

Same architecture as `Qwen/Qwen3-VL-4B-Instruct`, only small: a 4-block ViT with full attention in every block
(patch 8, temporal patch 2, learned 8x8 position grid interpolated per image), the 2x2 patch merger, DeepStack
mergers after blocks 0 and 2 whose features are added to the first two LLM layers at the image positions, and a
3-layer Qwen3 decoder with interleaved M-RoPE (``mrope_section`` 4+2+2 = head_dim / 2). Same tokenizer and pixel
range as the Qwen2.5-VL mini (`tiny_qwen2_5_vl`); a video is one ``<t seconds><|vision_start|>...<|vision_end|>``
block per temporal patch, as the real processor writes it.
"""

from __future__ import annotations

import torch
from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from .tiny import TinyVLM
from .tiny_qwen2_5_vl import (
    MAX_PIXELS,
    MERGE_SIZE,
    MIN_PIXELS,
    PATCH_SIZE,
    mrope_text_kwargs,
    qwen_prompt,
    qwen_tokenizer,
    vision_kwargs,
)
from .tiny_qwen2_5_vl import token_ids as _token_ids


def tiny_qwen3_vl(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> Qwen3VLForConditionalGeneration:
    """A random Qwen3-VL with DeepStack features from vision blocks 0 and 2."""
    tok = qwen_tokenizer()
    vision = vision_kwargs(num_position_embeddings=64, deepstack_visual_indexes=[0, 2])
    text = mrope_text_kwargs(tok, [4, 2, 2], mrope_interleaved=True)
    text["head_dim"] = 16
    config = Qwen3VLConfig(vision_config=vision, text_config=text, **_token_ids(tok))
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype).eval()


def tiny_qwen3_vl_processor() -> Qwen3VLProcessor:
    """The processor matching `tiny_qwen3_vl` (16-64 px per side, multiples of 16; videos at most 8 frames)."""
    sizes = dict(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2)
    video = Qwen3VLVideoProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": 8 * MAX_PIXELS}, cap_pixels_per_frame=False, **sizes
    )
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **sizes),
        video_processor=video,
        tokenizer=qwen_tokenizer(),
    )


SPEC = TinyVLM("qwen3_vl", tiny_qwen3_vl, tiny_qwen3_vl_processor, qwen_prompt, vmtc=True, image_size=64)
