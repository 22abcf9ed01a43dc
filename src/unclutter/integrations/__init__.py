"""Model integrations: the shared runtime (`base`, `cmai_attention`, `vision`) and one adapter per family.

Importing this package registers every adapter with `unclutter.apply` (the order is the order `apply`
tries them in; each accepts only its own classes).
"""

from . import (  # noqa: F401  (each module registers its adapter)
    gemma3,
    idefics3,  # Idefics3 and SmolVLM
    internvl,
    llava,
    llava_next,
    llava_onevision,
    qwen2_5_vl,
    qwen3_vl,
)
from .base import ADAPTERS, Adapter, ConcurrentUseError, Handle, apply, register

__all__ = ["ADAPTERS", "Adapter", "ConcurrentUseError", "Handle", "apply", "register"]
