"""unclutter: better instruction following for vision-language models by removing image redundancy.

Implements VMTC (visual-modality token compression) and CMAI (cross-modality attention
inhibition) from Yang et al., AAAI 2025, as a one-line plug-in for Hugging Face transformers VLMs (LLaVA-1.5,
the paper's model; LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL, Gemma 3, InternVL, Idefics3, SmolVLM):

    handle = unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig())
    model.generate(**processor(images=image, text=prompt, return_tensors="pt"))
    handle.remove()
"""

from . import cmai, kmeans, vmtc
from .config import CMAIConfig, SPDConfig, VMTCConfig
from .integrations import ConcurrentUseError, Handle, apply

__version__ = "0.1.0"

__all__ = [
    "CMAIConfig",
    "ConcurrentUseError",
    "Handle",
    "SPDConfig",
    "VMTCConfig",
    "apply",
    "cmai",
    "kmeans",
    "vmtc",
    "__version__",
]
