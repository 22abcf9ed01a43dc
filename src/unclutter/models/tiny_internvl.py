"""A tiny random InternVL (`InternVLForConditionalGeneration`) and its processor, built from configs only.

Same architecture as `OpenGVLab/InternVL3-1B-hf`, only small: an InternViT tower with a CLS token and
q/k RMS norms (56 px tiles, patch 7 -> an 8x8 patch grid), the pixel shuffle (`downsample_ratio` 0.5: each
2x2 block of patches becomes one token, 16 per tile), the LayerNorm-MLP projector and a Qwen2 decoder. The
processor tiles images dynamically (GotOcr2's `crop_to_patches`, up to ``MAX_TILES`` tiles plus a thumbnail)
and wraps each image's ``<IMG_CONTEXT>`` run in ``<img>`` ... ``</img>``; a 56x56 image is one tile.

The tokenizer keeps InternVL's id layout: ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` are consecutive ids,
as in the official checkpoints (151665-151667).
"""

from __future__ import annotations

import torch
from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from .tiny import TinyVLM, text_kwargs, vision_kwargs, word_tokenizer

TILE_SIZE = 56
PATCH_SIZE = 7
TOKENS_PER_TILE = 16  # (56 / 7 / 2) ** 2: the 8x8 patch grid pixel-shuffled into 4x4 tokens
MAX_TILES = 4
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# InternVL's tokenizer attributes -> tokens; the first three in this order, as in the official tokenizers
IMAGE_SPECIALS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
EXTRA_WORDS = "Frame1 Frame2 Frame3 Frame4 and it video".split()  # the processor writes "FrameN:" per video frame


def tiny_internvl_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with InternVL's image tokens (``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``)."""
    return word_tokenizer(
        SPECIALS + list(IMAGE_SPECIALS.values()),
        EXTRA_WORDS,
        ["\n"],
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=dict(IMAGE_SPECIALS),
        additional_special_tokens=list(IMAGE_SPECIALS.values()),
    )


def tiny_internvl(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    vision_layers: int = 4,
    vision_feature_layer: int = -1,
    use_qk_norm: bool = True,
) -> InternVLForConditionalGeneration:
    """A random InternVL with ``TOKENS_PER_TILE`` image tokens per 56x56 tile."""
    tok = tiny_internvl_tokenizer()
    vision = InternVLVisionConfig(
        **vision_kwargs(TILE_SIZE, PATCH_SIZE, vision_layers, use_qk_norm=use_qk_norm, norm_type="layer_norm")
    )
    text = Qwen2Config(**text_kwargs(tok))
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_SPECIALS["context_image_token"]),
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    # transformers initialises the CLS token and position embeddings to zeros, layer scales and q/k norms to
    # constants: the CLS query would attend uniformly and every patch would tie in importance
    tower = model.model.vision_tower
    g = torch.Generator(tower.embeddings.cls_token.device).manual_seed(seed + 1)  # the micro presets build on CUDA too
    with torch.no_grad():
        tower.embeddings.cls_token.normal_(0.0, 1.0, generator=g)
        tower.embeddings.position_embeddings.normal_(0.0, 0.5, generator=g)
        for layer in tower.encoder.layer:
            for p in (layer.lambda_1, layer.lambda_2):
                p.uniform_(0.3, 1.0, generator=g)
            for norm in (layer.attention.q_norm, layer.attention.k_norm):
                if hasattr(norm, "weight"):
                    norm.weight.uniform_(0.5, 1.5, generator=g)
    # an untrained model readily samples image tokens (ids 4-7), which no trained InternVL emits: keep generation to
    # ordinary tokens
    model.generation_config.suppress_tokens = [tok.convert_tokens_to_ids(t) for t in IMAGE_SPECIALS.values()]
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype).eval()


def tiny_internvl_processor(max_tiles: int = MAX_TILES) -> InternVLProcessor:
    """The InternVL processor matching `tiny_internvl`: 56x56 tiles, dynamic tiling up to ``max_tiles`` + thumbnail."""
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE_SIZE, "width": TILE_SIZE}, crop_to_patches=True, min_patches=1, max_patches=max_tiles
    )
    video_processor = InternVLVideoProcessor(size={"height": TILE_SIZE, "width": TILE_SIZE})
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tiny_internvl_tokenizer(),
        video_processor=video_processor,
        image_seq_length=TOKENS_PER_TILE,
    )


def internvl_prompt(processor, question: str) -> str:
    """One user turn with one image (``<IMG_CONTEXT>`` is InternVL's in-text image placeholder)."""
    return f"user : {processor.image_token} {question} assistant :"


SPEC = TinyVLM(
    "internvl",
    tiny_internvl,
    tiny_internvl_processor,
    internvl_prompt,
    vmtc=True,
    spd=True,
    image_size=TILE_SIZE,
)
