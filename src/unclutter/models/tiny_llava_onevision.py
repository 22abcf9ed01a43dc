"""A tiny random LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`) and its processor, from configs only.

Same architecture as `llava-hf/llava-onevision-qwen2-0.5b-ov-hf`, only small: a SigLIP tower without CLS
(32 px tiles, patch 8 -> a 4x4 patch grid), "full" feature selection of the last block, a Qwen2 decoder,
anyres tiling on the real checkpoint's 1x1 ... 3x3 pinpoint grid scaled from 384 to 32 px, and
``anyres_max_4`` (the real one is ``anyres_max_9``) so that a 3x3-tile image is interpolated down
(96x96: 16 + 8*8 + 8 = 88 tokens) while a 2x2-tile one is not (64x64, ``SPEC.image_size``: 16 + 64 + 8).
Videos: 32 px frames, pooled 2x2 -> 4 tokens per frame, one newline per video.
"""

from __future__ import annotations

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from .tiny import TinyVLM, llava_prompt, text_kwargs, tiny_tokenizer, vision_kwargs

TILE = 32
PATCH = 8
PINPOINTS = [[TILE * rows, TILE * cols] for rows in (1, 2, 3) for cols in (1, 2, 3)]  # (height, width)
ASPECT = "anyres_max_4"


def tiny_onevision_tokenizer() -> PreTrainedTokenizerFast:
    """`tiny_tokenizer` plus OneVision's ``<video>`` placeholder."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tok


def tiny_llava_onevision(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    vision_layers: int = 4,
    text_layers: int = 3,
) -> LlavaOnevisionForConditionalGeneration:
    """A random LLaVA-OneVision with ``(TILE // PATCH) ** 2`` = 16 patches per tile or frame."""
    tok = tiny_onevision_tokenizer()
    vision = SiglipVisionConfig(**vision_kwargs(TILE, PATCH, vision_layers, intermediate=128, vision_use_head=False))
    text = Qwen2Config(**text_kwargs(tok, layers=text_layers, intermediate=192))
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=ASPECT,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    # a random model may emit its own placeholders, which a real one never does: keep generation to ordinary tokens
    model.generation_config.suppress_tokens = [config.image_token_id, config.video_token_id]
    return model.to(dtype).eval()


def tiny_llava_onevision_processor() -> LlavaOnevisionProcessor:
    """The OneVision processor matching `tiny_llava_onevision` (anyres tiles of 32 px, 32 px video frames)."""
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
        ),
        tokenizer=tiny_onevision_tokenizer(),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE}),
        num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=ASPECT,
    )


SPEC = TinyVLM(
    "llava_onevision",
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
    llava_prompt,
    vmtc=True,
    image_size=2 * TILE,
)
