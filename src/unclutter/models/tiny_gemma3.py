"""A tiny random Gemma 3 (`Gemma3ForConditionalGeneration`) and its processor, built from configs only.

Same architecture as `google/gemma-3-4b-it`, only small: a SigLIP tower without CLS (48 px, patch 4 ->
a 12x12 patch grid), the multi-modal projector average-pooling 3x3 patches -> 4x4 = 16 soft tokens per
image, and a Gemma 3 decoder mixing sliding-window and full-attention layers whose window (8) is much
shorter than the prompts (so sliding layers really drop keys, in prefill and in cached decoding).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from .tiny import WORDS, TinyVLM

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
    specials = SPECIALS + list(IMAGE_SPECIALS.values())
    words = sorted(set(WORDS + EXTRA_WORDS))
    vocab = {tok: i for i, tok in enumerate(specials + words + [":", "?", ".", ","])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=dict(IMAGE_SPECIALS),
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[4:] + list(IMAGE_SPECIALS.values())})
    tok.padding_side = "left"
    return tok


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
    vision = SiglipVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        vision_use_head=False,
    )
    text = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=sliding_window,
        layer_types=list(LAYER_TYPES),
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
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
        weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
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
