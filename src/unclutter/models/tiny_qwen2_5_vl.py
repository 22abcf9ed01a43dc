"""A tiny random Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) and its processor, built from configs only.

Same architecture as `Qwen/Qwen2.5-VL-7B-Instruct`, only small: a 4-block ViT (patch 8, temporal patch 2) whose
blocks 0 and 2 attend within 32-pixel windows (2x2 merge units) and blocks 1 and 3 over the whole image, the 2x2
patch merger (one LLM token per 16x16 pixels: a 64x64 image gives 16 tokens, 48x64 gives 12), and a 3-layer
Qwen2 decoder with M-RoPE (``mrope_section`` 2+3+3 = head_dim / 2). ``min_pixels``/``max_pixels`` keep images
between 16x16 and 64x64 pixels, so every test image gives few patches.

The tokenizer is word level with Qwen's special tokens (``<|im_start|>``, ``<|vision_start|>``, ``<|image_pad|>``,
``<|video_pad|>`` ...) and the digits / ``seconds`` / ``<`` ``>`` that Qwen3-VL's video timestamps use.
"""

from __future__ import annotations

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from .tiny import TinyVLM, text_kwargs, word_tokenizer

PATCH_SIZE = 8
MERGE_SIZE = 2
MIN_PIXELS = 16 * 16
MAX_PIXELS = 64 * 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
VISION_SPECIALS = {
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}
EXTRA_WORDS = [*"0123456789", "seconds", "video", "frame"]


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen's chat and vision special tokens (shared by the Qwen2.5-VL and Qwen3-VL minis)."""
    return word_tokenizer(
        SPECIALS + list(VISION_SPECIALS.values()),
        EXTRA_WORDS,
        ["<", ">"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        extra_special_tokens=dict(VISION_SPECIALS),
        additional_special_tokens=SPECIALS[1:3] + list(VISION_SPECIALS.values()),
    )


def token_ids(tok: PreTrainedTokenizerFast) -> dict:
    """The config's special-token ids (image/video pads, vision start/end)."""
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in VISION_SPECIALS.items()}
    return {f"{name}_id": value for name, value in ids.items()}


def mrope_text_kwargs(tok: PreTrainedTokenizerFast, mrope_section: list[int], **extra) -> dict:
    """`text_kwargs` with M-RoPE: 4 query / 2 key-value heads of 16 dims (mrope_section sums to 8), no BOS token."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section, **extra}
    return text_kwargs(tok, rope_parameters=rope)


def vision_kwargs(**extra) -> dict:
    """The 4-block ViT of both Qwen minis: patch 8, temporal patch 2, a 2x2 merger into the decoder's 64 dims."""
    return dict(
        depth=4,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        out_hidden_size=64,
        **extra,
    )


def tiny_qwen2_5_vl(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> Qwen2_5_VLForConditionalGeneration:
    """A random Qwen2.5-VL: window attention in vision blocks 0 and 2, full attention in 1 and 3."""
    tok = qwen_tokenizer()
    vision = vision_kwargs(
        window_size=32,  # pixels: 32 // merge 2 // patch 8 = windows of 2x2 merge units
        fullatt_block_indexes=[1, 3],
        tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=mrope_text_kwargs(tok, [2, 3, 3]), **token_ids(tok))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype).eval()


def tiny_qwen2_5_vl_processor() -> Qwen2_5_VLProcessor:
    """The processor matching `tiny_qwen2_5_vl`: images and video frames resized to 16-64 px per side (x16)."""
    sizes = dict(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2, min_pixels=MIN_PIXELS)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(max_pixels=MAX_PIXELS, **sizes),
        video_processor=Qwen2VLVideoProcessor(max_pixels=8 * MAX_PIXELS, cap_pixels_per_frame=False, **sizes),
        tokenizer=qwen_tokenizer(),
    )


def qwen_prompt(processor, question: str) -> str:
    """One user turn in Qwen's chat format with one image before the question, ready for generation."""
    image = f"<|vision_start|>{processor.image_token}<|vision_end|>"
    return f"<|im_start|>user {image}{question}<|im_end|><|im_start|>assistant"


SPEC = TinyVLM("qwen2_5_vl", tiny_qwen2_5_vl, tiny_qwen2_5_vl_processor, qwen_prompt, vmtc=True, image_size=64)
