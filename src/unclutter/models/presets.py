"""Random-init models with real shapes, and their processors, for speed and memory benchmarks (no weights needed).

Full presets have the published checkpoints' shapes: ``llava-1.5-7b`` (CLIP ViT-L/14-336, Vicuna-7B),
``llava-next-7b`` (llava-v1.6-vicuna-7b: the same tower on anyres tiles), ``qwen2.5-vl-7b``
(Qwen2.5-VL-7B-Instruct: 32-block windowed ViT, 28-layer 3584-wide decoder) and ``gemma-3-4b`` (gemma-3-4b-it:
27-block SigLIP at 896 px, 34-layer decoder). Each has a ``-cpu`` twin that fits 2 CPU cores: every width,
vocabulary and image geometry stays; only depths shrink. ``llava-1.5-7b-cpu`` (alias ``cpu``) and
``llava-next-7b-cpu`` keep the whole CLIP tower and 4 LLM layers; ``qwen2.5-vl-7b-cpu`` and ``gemma-3-4b-cpu`` keep
a quarter of both the vision blocks and the LLM layers, so the vision tower's share of the time to first token is
the full model's (their towers are too slow on 2 cores to keep whole). ``micro-<family>`` builds the tiny test
model of a supported family (`unclutter.models.tiny`), for checking the benchmark pipeline in seconds.

Processors are the families' own classes with the real image settings; their tokenizer is the word-level one of
the family's tiny model (the real special tokens, a small vocabulary), whose ids the configs use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    SiglipVisionConfig,
)

from .tiny import FAMILIES, tiny_tokenizer, tiny_vlm


@dataclass(frozen=True)
class Preset:
    """One benchmark model: ``model(layers)`` builds it (``layers``: LLM layers, None for the preset's own),
    ``processor()`` its processor, ``image`` the (height, width) of the benchmark image."""

    name: str
    model: Callable[[int | None], torch.nn.Module]
    processor: Callable[[], ProcessorMixin]
    image: tuple[int, int]
    new_tokens: int  # generated tokens per run by default
    about: str
    spd_grid: int = 12  # SPD's pooled grid (per image or tile): 12x12 of 24x24 is 25% of the tokens


# ---- LLaVA-1.5 and LLaVA-NeXT: CLIP ViT-L/14-336 and a Vicuna-7B-shaped LLaMA ----------------------------------
CLIP_L = dict(
    image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _vicuna(layers: int, tok) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip


def llava15_config(num_llm_layers: int = 32) -> LlavaConfig:
    tok = tiny_tokenizer()
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_L), text_config=_vicuna(num_llm_layers, tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip


def llava_next_config(num_llm_layers: int = 32) -> LlavaNextConfig:
    tok = tiny_tokenizer()
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**CLIP_L), text_config=_vicuna(num_llm_layers, tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=NEXT_PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip


def llava15_processor() -> LlavaProcessor:
    images = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(
        image_processor=images, tokenizer=tiny_tokenizer(), patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )  # fmt: skip


def llava_next_processor() -> LlavaNextProcessor:
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=NEXT_PINPOINTS
    )
    return LlavaNextProcessor(
        image_processor=images, tokenizer=tiny_tokenizer(), patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )  # fmt: skip


# ---- Qwen2.5-VL-7B-Instruct ---------------------------------------------------------------------------------------
def qwen25_config(vision_blocks: int = 32, llm_layers: int = 28, tied: bool = False) -> Qwen2_5_VLConfig:
    """Full attention in every 8th block (7, 15, 23, 31), windowed elsewhere; fewer blocks keep that rhythm."""
    from .tiny_qwen2_5_vl import qwen_tokenizer, token_ids

    tok = qwen_tokenizer()
    every = 8 if vision_blocks == 32 else 2
    vision = dict(
        depth=vision_blocks, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, hidden_act="silu",
        fullatt_block_indexes=list(range(every - 1, vision_blocks, every)), tokens_per_second=2,
    )  # fmt: skip
    text = dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=llm_layers,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=tied,
    )  # fmt: skip
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=tied, **token_ids(tok))


def qwen25_processor() -> Qwen2_5_VLProcessor:
    from .tiny_qwen2_5_vl import qwen_tokenizer

    sizes = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(max_pixels=28 * 28 * 1280, **sizes),
        video_processor=Qwen2VLVideoProcessor(max_pixels=28 * 28 * 1280, **sizes),
        tokenizer=qwen_tokenizer(),
    )


# ---- Gemma-3-4b-it -----------------------------------------------------------------------------------------------
def gemma3_config(vision_blocks: int = 27, llm_layers: int = 34) -> Gemma3Config:
    """Five sliding-window (1024) layers, then one global, repeated."""
    from .tiny_gemma3 import IMAGE_SPECIALS, tiny_gemma3_tokenizer

    tok = tiny_gemma3_tokenizer()
    vision = SiglipVisionConfig(
        image_size=896, patch_size=14, hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_blocks,
        num_attention_heads=16, vision_use_head=False,
    )  # fmt: skip
    kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(llm_layers)]
    text = Gemma3TextConfig(
        vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=llm_layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
        layer_types=kinds, max_position_embeddings=131072, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in IMAGE_SPECIALS.items()}
    return Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=256, image_token_index=ids["image_token"],
        boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
    )  # fmt: skip


def gemma3_processor() -> Gemma3Processor:
    from .tiny_gemma3 import tiny_gemma3_tokenizer

    images = Gemma3ImageProcessorPil(size={"height": 896, "width": 896})
    return Gemma3Processor(image_processor=images, tokenizer=tiny_gemma3_tokenizer(), image_seq_length=256)


# ---- the registry ------------------------------------------------------------------------------------------------
PRESETS: dict[str, Preset] = {}


def _add(name, build, processor, image, new_tokens, about, spd_grid=12) -> None:
    PRESETS[name] = Preset(name, build, processor, image, new_tokens, about, spd_grid)


_add(
    "llava-1.5-7b",
    lambda n: LlavaForConditionalGeneration(llava15_config(n or 32)),
    llava15_processor,
    (336, 336),
    64,
    "LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 patches), 32-layer Vicuna-7B",
)
_add(
    "llava-1.5-7b-cpu",
    lambda n: LlavaForConditionalGeneration(llava15_config(n or 4)),
    llava15_processor,
    (336, 336),
    64,
    "LLaVA-1.5-7B shapes, whole CLIP tower, 4 of 32 LLM layers",
)
_add(
    "llava-next-7b",
    lambda n: LlavaNextForConditionalGeneration(llava_next_config(n or 32)),
    llava_next_processor,
    (672, 672),
    64,
    "LLaVA-NeXT-7B (v1.6 Vicuna): 672x672 -> base + 2x2 tiles, 2,928 tokens",
)
_add(
    "llava-next-7b-cpu",
    lambda n: LlavaNextForConditionalGeneration(llava_next_config(n or 4)),
    llava_next_processor,
    (672, 672),
    16,
    "LLaVA-NeXT-7B shapes, 5 tiles, whole CLIP tower, 4 of 32 LLM layers",
)
_add(
    "qwen2.5-vl-7b",
    lambda n: Qwen2_5_VLForConditionalGeneration(qwen25_config(32, n or 28)),
    qwen25_processor,
    (480, 640),
    64,
    "Qwen2.5-VL-7B: 640x480 -> 476x644 px, 1,564 patches, 391 tokens; 28-layer decoder",
)
_add(
    "qwen2.5-vl-7b-cpu",
    lambda n: Qwen2_5_VLForConditionalGeneration(qwen25_config(8, n or 7, tied=True)),
    qwen25_processor,
    (480, 640),
    16,
    "Qwen2.5-VL-7B shapes, 8 of 32 vision blocks (full attention in 1, 3, 5, 7), 7 of 28 LLM layers, tied LM head",
)
_add(
    "gemma-3-4b",
    lambda n: Gemma3ForConditionalGeneration(gemma3_config(27, n or 34)),
    gemma3_processor,
    (896, 896),
    64,
    "Gemma-3-4B: SigLIP at 896 px (4,096 patches -> 256 tokens), 34-layer decoder",
)
_add("gemma-3-4b-cpu", lambda n: Gemma3ForConditionalGeneration(gemma3_config(7, n or 9)), gemma3_processor, (896, 896), 16,
     "Gemma-3-4B shapes, 7 of 27 vision blocks, 9 of 34 LLM layers (sliding x5, global, sliding x3)", spd_grid=8)  # fmt: skip
PRESETS["cpu"] = PRESETS["llava-1.5-7b-cpu"]
MICRO = tuple(f"micro-{family}" for family in FAMILIES)


def get_preset(name: str) -> Preset:
    """A preset by name; ``micro-<family>`` wraps the family's tiny test model (imported on demand)."""
    if name in MICRO:
        spec = tiny_vlm(name.removeprefix("micro-"))
        size = (spec.image_size,) * 2
        return Preset(name, lambda n: spec.model(), spec.processor, size, 4, f"tiny {spec.family}", spd_grid=2)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join([*PRESETS, *MICRO])}.")
    return PRESETS[name]


def build_preset(
    name: str, *, device: str = "cpu", dtype: torch.dtype | None = None, cpu_layers: int | None = None, seed: int = 0
):
    """(model, processor, preset) for preset ``name``, random-init on ``device`` (bf16 on CUDA, fp32 on CPU by
    default); ``cpu_layers`` overrides the preset's LLM depth."""
    preset = get_preset(name)
    if cpu_layers is not None and name in MICRO:
        raise ValueError(
            f"{name} is a tiny test model of fixed depth; cpu_layers (--cpu-layers) sets the LLM depth of the "
            "full-size presets only. Drop it, or use a full-size preset."
        )
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialise in place: no 7B fp32 copy in host memory
            model = preset.model(cpu_layers)
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("sdpa")
    processor = preset.processor()
    processor.tokenizer.padding_side = "left"
    return model.to(device, dtype).eval(), processor, preset
