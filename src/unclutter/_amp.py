"""One decorator shared by the pure method functions (vmtc, cmai, kmeans)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)`` where autocast is on, else a no-op context: entering the
    autocast context costs as much as a few small kernels, and the hot paths (decode steps) run without autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_off(fn: F) -> F:
    """Run ``fn`` with autocast disabled on the device of its first tensor argument.

    Rankings, quantiles, K-means and weighted merges must not drop to bf16/fp16 under a caller's
    mixed-precision context: a rounded score reorders ties and moves a quantile. Inputs keep their
    dtype; the functions cast to float32 themselves where it matters.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # a plain loop, not next() over a generator: torch 2.7's dynamo cannot trace that, and these functions run
        # inside compiled vision towers
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, torch.Tensor):
                with autocast_disabled(arg.device.type):
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
