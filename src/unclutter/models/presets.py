"""Random-init LLaVA-1.5 models with real shapes, for speed and memory benchmarks (no weights needed).

``llava-1.5-7b``: CLIP ViT-L/14-336 (24 blocks, 576 patches), 2-layer GELU projector, 32-layer
4096-wide LLaMA (Vicuna-7B shape). ``cpu``: the same vision tower and LLaMA-7B-shaped layers, but
only ``cpu_layers`` of them, so a full benchmark fits in minutes on 2 CPU cores.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 32000
PRESETS = ("llava-1.5-7b", "cpu")


def llava15_config(num_llm_layers: int = 32) -> LlavaConfig:
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=24, num_attention_heads=16, projection_dim=768, hidden_act="quick_gelu",
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_llm_layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip


def build_preset(
    name: str, *, device: str = "cpu", dtype: torch.dtype | None = None, cpu_layers: int = 4, seed: int = 0
):
    """A random-init model of preset ``name`` on ``device`` (bf16 on CUDA, fp32 on CPU by default)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {PRESETS}.")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    config = llava15_config(32 if name == "llava-1.5-7b" else cpu_layers)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialise in place: no 7B fp32 copy in host memory
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("sdpa")
    return model.eval()
