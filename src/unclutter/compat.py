"""The transformers releases we test, and the few places where they differ.

unclutter hooks into transformers at run time, and transformers renames things between minor
releases (5.24 renamed the forward's ``past_key_values`` argument to ``cache``). Rather than
branching on version numbers, the code here finds what it needs by type (a `Cache` instance among
the call's arguments, in a model output) or by signature, so a rename either keeps working or fails
loudly in the integration's own checks (see ``cmai_attention``), never silently.

``TESTED`` is the range CI runs the exactness suite on (its lowest and newest release); pyproject
admits exactly this range, and `apply` warns once on a release outside it.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import transformers
from packaging.version import Version
from transformers import Cache

TESTED = ("5.23.0", "5.25.0")  # lowest and newest release CI runs the exactness suite on (any patch of the newest)


def transformers_version() -> str:
    return transformers.__version__


def in_tested_range(version: str | None = None) -> bool:
    v = Version(version or transformers_version())
    low, high = Version(TESTED[0]), Version(TESTED[1])
    return low <= v and (v.major, v.minor) <= (high.major, high.minor)


@functools.cache
def warn_if_untested() -> None:
    """Warn once per process when the installed transformers lies outside the tested range."""
    if not in_tested_range():
        warnings.warn(
            f"unclutter is tested with transformers {TESTED[0]} to {TESTED[1]} (any patch release), but "
            f"{transformers_version()} is installed. Its hooks check what they rely on and fail loudly, but run "
            f"`make compat` (or pin transformers>={TESTED[0]},<={TESTED[1]}) before trusting results.",
            stacklevel=3,
        )


def find_cache(args: tuple = (), kwargs: Mapping[str, Any] | None = None) -> Cache | None:
    """The `Cache` passed to a forward call, whatever the argument is called in this release."""
    found = [v for v in (*args, *(kwargs or {}).values()) if isinstance(v, Cache)]
    if len(found) > 1:
        raise RuntimeError(f"a forward call got {len(found)} caches; unclutter expects at most one.")
    return found[0] if found else None


def output_cache(output: Any) -> Cache | None:
    """The `Cache` a model output or a `generate` output carries (``cache`` or ``past_key_values``)."""
    if isinstance(output, Mapping):
        values = output.values()
    elif isinstance(output, tuple):
        values = output
    else:
        return None
    return next((v for v in values if isinstance(v, Cache)), None)


def cache_argument(model) -> str:
    """The forward's name for the cache argument (``cache`` from 5.24, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(
        f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values` in transformers "
        f"{transformers_version()}; unclutter needs updating for this release."
    )


def image_features(model, pixel_values, **kwargs) -> list:
    """Per-image projected features, via the public ``get_image_features(...).pooler_output``."""
    out = model.get_image_features(pixel_values=pixel_values, **kwargs)
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out
    return list(pooled)
