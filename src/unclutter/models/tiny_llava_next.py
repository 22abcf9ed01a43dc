"""A tiny random LLaVA-NeXT (`LlavaNextForConditionalGeneration`) and its processor, built from configs only.

Same architecture as `llava-hf/llava-v1.6-mistral-7b-hf`, only small: a CLIP tower with CLS (32 px tiles,
patch 8 -> a 4x4 patch grid per tile), `vision_feature_layer=-2` with "default" selection, a LLaMA decoder,
and anyres tiling with the real checkpoint's pinpoints scaled from 336 to 32 px (1x2, 2x1, 2x2, 1x3, 3x1
tiles), so ordinary test images give several tiles, unpadding and one ``image_newline`` per patch row.
A 64x64 image (``SPEC.image_size``) fills 2x2 tiles exactly: 16 + 8*8 + 8 = 88 image tokens, no padding.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    MistralConfig,
)

from .tiny import TinyVLM, llava_prompt, text_kwargs, tiny_tokenizer, vision_kwargs

TILE = 32
PATCH = 8
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # (height, width), as [[336, 672], ...] / 10.5


def tiny_llava_next(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    vision_layers: int = 4,
    text_layers: int = 3,
    mistral_window: int | None = None,
) -> LlavaNextForConditionalGeneration:
    """A random LLaVA-NeXT with ``(TILE // PATCH) ** 2`` = 16 patches per tile; with ``mistral_window``, on a Mistral
    decoder whose layers attend within that sliding window (LLaVA-NeXT-Mistral's layout), else on a Llama one."""
    tok = tiny_tokenizer()
    vision = CLIPVisionConfig(**vision_kwargs(TILE, PATCH, vision_layers, intermediate=128, projection_dim=32))
    text_args = text_kwargs(tok, layers=text_layers, intermediate=192)
    text = (
        LlamaConfig(**text_args)
        if mistral_window is None
        else MistralConfig(**text_args, sliding_window=mistral_window)
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    # a random model may emit its own placeholder, which a real one never does: keep generation to ordinary tokens
    model.generation_config.suppress_tokens = [config.image_token_id]
    return model.to(dtype).eval()


def tiny_llava_next_processor() -> LlavaNextProcessor:
    """The LLaVA-NeXT processor matching `tiny_llava_next` (CLIP normalisation, anyres tiles of 32 px)."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


SPEC = TinyVLM(
    "llava_next", tiny_llava_next, tiny_llava_next_processor, llava_prompt, vmtc=True, spd=True, image_size=2 * TILE
)
