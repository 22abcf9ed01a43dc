"""Model integrations: the shared runtime (`base`, `cmai_attention`, `vision`) and one adapter per family.

Importing this package registers every adapter with `unclutter.apply`.
"""

from . import llava  # noqa: F401  (registers the adapter)
from .base import ADAPTERS, Adapter, Handle, apply, register

__all__ = ["ADAPTERS", "Adapter", "Handle", "apply", "register"]
