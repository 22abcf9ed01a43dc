"""A tiny random Gemma 3 (`Gemma3ForConditionalGeneration`) and its processor, built from configs only.

Same architecture as `google/gemma-3-4b-it`, only small: a SigLIP tower without CLS (48 px, patch 4 ->
a 12x12 patch grid), the multi-modal projector average-pooling 3x3 patches -> 4x4 = 16 soft tokens per
image, and a Gemma 3 decoder mixing sliding-window and full-attention layers whose window (8) is much
shorter than the prompts (so sliding layers really drop keys, in prefill and in cached decoding).
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from .tiny import TinyVLM, text_kwargs, vision_kwargs, word_tokenizer

IMAGE_SIZE = 48
PATCH_SIZE = 4
TOKENS_PER_IMAGE = 16  # 4x4 soft tokens: the projector pools 3x3 patches of the 12x12 grid
SLIDING_WINDOW = 8
LAYER_TYPES = ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
IMAGE_SPECIALS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
EXTRA_WORDS = "model Here here original and some crops to help you see better".split()


def tiny_gemma3_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Gemma 3's special tokens (turn markers, image begin/end, image soft token)."""
    return word_tokenizer(
        SPECIALS + list(IMAGE_SPECIALS.values()),
        EXTRA_WORDS,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=dict(IMAGE_SPECIALS),
        additional_special_tokens=SPECIALS[4:] + list(IMAGE_SPECIALS.values()),
    )


def tiny_gemma3(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    vision_layers: int = 4,
    sliding_window: int = SLIDING_WINDOW,
) -> Gemma3ForConditionalGeneration:
    """A random Gemma 3 with ``TOKENS_PER_IMAGE`` soft tokens per image (crop) and a ``sliding_window`` of 8."""
    tok = tiny_gemma3_tokenizer()
    vision = SiglipVisionConfig(**vision_kwargs(IMAGE_SIZE, PATCH_SIZE, vision_layers, vision_use_head=False))
    text = Gemma3TextConfig(
        **text_kwargs(
            tok,
            layers=len(LAYER_TYPES),
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=sliding_window,
            layer_types=list(LAYER_TYPES),
        )
    )
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_SPECIALS["image_token"]),
        boi_token_index=tok.convert_tokens_to_ids(IMAGE_SPECIALS["boi_token"]),
        eoi_token_index=tok.convert_tokens_to_ids(IMAGE_SPECIALS["eoi_token"]),
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # transformers initialises the projection to zeros: images would carry no signal
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        weight.normal_(0.0, 0.05, generator=torch.Generator(weight.device).manual_seed(seed + 1))  # built on any device
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype).eval()


def tiny_gemma3_processor() -> Gemma3Processor:
    """The Gemma 3 processor matching `tiny_gemma3` (resize to 48x48; pan-and-scan off unless asked for)."""
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Gemma3Processor(
        image_processor=image_processor, tokenizer=tiny_gemma3_tokenizer(), image_seq_length=TOKENS_PER_IMAGE
    )


def gemma3_prompt(processor, question: str) -> str:
    """One user turn with one image, Gemma 3's turn format, ready for generation."""
    return f"<bos><start_of_turn>user {processor.boi_token} {question}<end_of_turn><start_of_turn>model"


SPEC = TinyVLM(
    "gemma3",
    tiny_gemma3,
    tiny_gemma3_processor,
    gemma3_prompt,
    nested_images=True,
    vmtc=True,
    spd=True,
    image_size=IMAGE_SIZE,
)
