"""Configuration objects for the three methods.

Each config is a small frozen dataclass that validates itself on construction, so a bad value
fails where the user wrote it, not deep inside a forward pass.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

MergeMode = Literal["cluster", "single", "drop"]
ImportanceMode = Literal["cls", "received"]
FocusMode = Literal["paper", "tia", "sum", "discounted"]


def _as_tuple(value: Sequence[int] | Sequence[float] | None) -> tuple | None:
    return None if value is None else tuple(value)


def _ints(name: str, value):
    """``value`` (a number, a tuple of them, or None) as Python ints (numpy's too); raise unless it holds integers
    only: a float token count or block index would otherwise pass here and fail inside a forward pass or the
    processor."""
    for v in value if isinstance(value, tuple) else (value,):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            raise ValueError(f"{name} takes integers, got {value!r}.")
    if isinstance(value, tuple):
        return tuple(int(v) for v in value)
    return None if value is None else int(value)


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}.")


DEFAULT_RATIO = 0.5


@dataclass(frozen=True)
class VMTCConfig:
    """Visual-modality token compression inside the vision tower.

    Budget: ``num_tokens`` (patch tokens reaching the LLM per image) or ``ratio`` of the patch grid
    (0.5 -> 288 of 576 on LLaVA-1.5), rounded as Python's ``round`` (half to even) and at least 1 token (or
    merge unit) per image, tile or frame. Placement: ``layers`` (0-based vision block indices) or
    ``num_stages`` equally spaced blocks ending at the block whose output LLaVA feeds the projector
    (default 4, fewer when the tower has fewer blocks up to that one).
    ``stage_tokens`` optionally fixes the patch-token count after each stage (the last one must equal
    the budget); by default the count shrinks geometrically. ``clusters`` is the K-means cluster
    count per stage (int for all stages or one per stage); by default ``max(1, tokens_after // 8)``.
    ``merge``: "cluster" (the paper), "single" (all redundant tokens into one) or "drop" (prune).
    ``normalize``: importance-weighted mean (default) instead of Eq. 7's unnormalised sum.
    ``importance``: how patches are ranked: "cls" (the paper: the CLS token's attention) or "received"
    (the mean attention each patch receives from all patches, for towers without a CLS token); None
    picks the tower's default ("cls" where the tower has a CLS token).
    """

    ratio: float = 0.5  # DEFAULT_RATIO
    num_tokens: int | None = None
    num_stages: int | None = None  # None: 4, or every block up to the feature layer if fewer
    layers: tuple[int, ...] | None = None
    stage_tokens: tuple[int, ...] | None = None
    clusters: int | tuple[int, ...] | None = None
    merge: MergeMode = "cluster"
    normalize: bool = True
    kmeans_iters: int = 10
    importance: ImportanceMode | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _as_tuple(self.layers))
        object.__setattr__(self, "stage_tokens", _as_tuple(self.stage_tokens))
        if not isinstance(self.clusters, numbers.Integral | type(None)):
            object.__setattr__(self, "clusters", _as_tuple(self.clusters))
        for name in ("num_tokens", "num_stages", "layers", "stage_tokens", "kmeans_iters"):
            object.__setattr__(self, name, _ints(f"VMTCConfig.{name}", getattr(self, name)))
        _check_real("VMTCConfig.ratio", self.ratio)
        if self.num_tokens is not None and self.ratio != DEFAULT_RATIO:
            raise ValueError(
                f"VMTCConfig got ratio={self.ratio} and num_tokens={self.num_tokens}: the budget is one of them; "
                "give ratio or num_tokens, not both."
            )
        if not isinstance(self.normalize, bool):
            raise ValueError(f"VMTCConfig.normalize is True or False, got {self.normalize!r}.")
        if self.num_tokens is None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"VMTCConfig.ratio must be in (0, 1], got {self.ratio}; or set num_tokens.")
        if self.num_tokens is not None and self.num_tokens < 1:
            raise ValueError(
                f"VMTCConfig.num_tokens must be >= 1, got {self.num_tokens}: at least one image token must "
                "reach the LLM."
            )
        if self.layers is None and self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"VMTCConfig.num_stages must be >= 1, got {self.num_stages}.")
        if self.layers is not None and (len(self.layers) == 0 or list(self.layers) != sorted(set(self.layers))):
            raise ValueError(f"VMTCConfig.layers must be distinct ascending block indices, got {self.layers}.")
        if self.merge not in ("cluster", "single", "drop"):
            raise ValueError(f"VMTCConfig.merge must be 'cluster', 'single' or 'drop', got {self.merge!r}.")
        if self.importance not in (None, "cls", "received"):
            raise ValueError(f"VMTCConfig.importance must be 'cls', 'received' or None, got {self.importance!r}.")
        if self.kmeans_iters < 1:
            raise ValueError(f"VMTCConfig.kmeans_iters must be >= 1, got {self.kmeans_iters}.")
        per_stage = self.clusters if isinstance(self.clusters, tuple) else (self.clusters,)
        if self.clusters is not None and any(
            isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1 for c in per_stage
        ):
            raise ValueError(
                f"VMTCConfig.clusters must be an integer >= 1 (or one per stage), got {self.clusters}; "
                "merge='drop' removes the redundant patches without clusters."
            )
        object.__setattr__(self, "clusters", _ints("VMTCConfig.clusters", self.clusters))


@dataclass(frozen=True)
class CMAIConfig:
    """Cross-modality attention inhibition in the LLM.

    ``gamma_max``: inhibition ratio at the last LLM layer; gamma grows linearly with layer depth,
    ``gamma(l) = gamma_max * l / (num_layers - 1)``, so layer 0 is untouched. ``gammas`` gives one value
    per active layer instead. ``layers`` restricts CMAI to these LLM layers (default: all).
    ``focus``: the focus score (Table 5): "paper" (Eq. 9-11), "tia" (text-to-image attention alone),
    "sum" (cumulative sum over text rows up to the query), "discounted" (the same weighted by
    ``discount ** distance``).
    """

    gamma_max: float = 0.6
    gammas: tuple[float, ...] | None = None
    layers: tuple[int, ...] | None = None
    focus: FocusMode = "paper"
    discount: float = 0.9

    def __post_init__(self) -> None:
        object.__setattr__(self, "gammas", _as_tuple(self.gammas))
        object.__setattr__(self, "layers", _as_tuple(self.layers))
        object.__setattr__(self, "layers", _ints("CMAIConfig.layers", self.layers))
        _check_real("CMAIConfig.discount", self.discount)
        check_gamma(self.gamma_max, "CMAIConfig.gamma_max")
        for g in self.gammas or ():
            check_gamma(g, "CMAIConfig.gammas")
        if self.gammas is not None and self.layers is not None and len(self.gammas) != len(self.layers):
            raise ValueError(
                f"CMAIConfig.gammas has {len(self.gammas)} values but layers has {len(self.layers)}: give one "
                "gamma per active layer."
            )
        if self.layers is not None and (len(self.layers) == 0 or list(self.layers) != sorted(set(self.layers))):
            raise ValueError(f"CMAIConfig.layers must be distinct ascending layer indices, got {self.layers}.")
        if self.focus not in ("paper", "tia", "sum", "discounted"):
            raise ValueError(f"CMAIConfig.focus must be 'paper', 'tia', 'sum' or 'discounted', got {self.focus!r}.")
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"CMAIConfig.discount must be in (0, 1], got {self.discount}.")


@dataclass(frozen=True)
class SPDConfig:
    """Spatial down-sampling baseline: average-pool the image's (or tile's) grid of LLM tokens to ``grid x grid``."""

    grid: int = 12

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", _ints("SPDConfig.grid", self.grid))
        if self.grid is None:
            raise ValueError("SPDConfig.grid takes an integer >= 1 (the pooled grid's side), got None.")
        if self.grid < 1:
            raise ValueError(f"SPDConfig.grid must be >= 1, got {self.grid}.")


def check_gamma(gamma: float, name: str = "gamma") -> None:
    """Raise unless ``0 <= gamma < 1`` (gamma = 1 would inhibit every image key but the maximum)."""
    if not isinstance(gamma, int | float) or not 0.0 <= float(gamma) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {gamma!r}: it is the fraction of image keys inhibited.")
