"""Cross-modality attention inhibition (CMAI), the pure tensor part (paper Eq. 9-11).

For text queries, a focus score F over image keys combines the query's own text-to-image
attention with that of the earlier text tokens it attends to:

    A_t2n = strictly-lower-triangular part of the text->text attention       (Eq. 9)
    F     = A_t2n @ A_t2i + A_t2i                                           (Eq. 10-11)

Per text row, image keys whose F lies strictly below the row's gamma-quantile are inhibited
(-inf added to their attention logits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._amp import autocast_off
from .config import check_gamma

FOCUS_MODES = ("paper", "tia", "sum", "discounted")


def text_weights(
    a_t2t: torch.Tensor | None, m: int, mode: str = "paper", discount: float = 0.9, *, like: torch.Tensor
) -> torch.Tensor | None:
    """The (.., m, m) strictly-lower weights W with F = W @ A_t2i + A_t2i for each focus mode.

    "paper": W = tril(A_t2t, -1). "tia": no W (F = A_t2i). "sum": W = 1 below the diagonal.
    "discounted": W[j, h] = discount ** (j - h) below the diagonal.
    """
    if mode == "paper":
        return torch.tril(a_t2t, diagonal=-1)
    if mode == "tia":
        return None
    j = torch.arange(m, device=like.device)
    dist = (j[:, None] - j[None, :]).to(like.dtype)
    below = dist > 0
    if mode == "sum":
        return below.to(like.dtype)
    if mode == "discounted":
        return torch.where(below, torch.as_tensor(discount, dtype=like.dtype, device=like.device) ** dist, 0.0)
    raise ValueError(f"focus must be one of {FOCUS_MODES}, got {mode!r}.")


@autocast_off
def focus_scores(
    a_t2t: torch.Tensor, a_t2i: torch.Tensor, *, mode: str = "paper", discount: float = 0.9
) -> torch.Tensor:
    """Text-to-image focus score F.

    Args:
        a_t2t: (..., m, m) head-averaged text->text attention (query rows, key columns). Only the
            strictly lower triangle is used (Eq. 9); the diagonal and above are ignored.
        a_t2i: (..., m, n) head-averaged text->image attention.
        mode: "paper" (Eq. 9-11), "tia", "sum" or "discounted" (Table 5 variants).
        discount: base of the distance discount for mode="discounted".

    Returns:
        (..., m, n) focus scores; in float32 for bf16/fp16 attention (Eq. 10's sum and the ranking after it
        would otherwise round to the half dtype).
    """
    if a_t2i.dtype in (torch.float16, torch.bfloat16) or a_t2t.dtype in (torch.float16, torch.bfloat16):
        a_t2t, a_t2i = a_t2t.float(), a_t2i.float()
    m = a_t2i.shape[-2]
    if a_t2t.shape[-2:] != (m, m):
        raise ValueError(
            f"a_t2t must be (..., {m}, {m}) to match a_t2i {tuple(a_t2i.shape)}, got {tuple(a_t2t.shape)}."
        )
    w = text_weights(a_t2t, m, mode, discount, like=a_t2i)
    return a_t2i if w is None else w @ a_t2i + a_t2i


def row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q, dim=-1, keepdim=True)`` (linear interpolation), without its size limit."""
    return masked_row_quantile(x, torch.ones_like(x, dtype=torch.bool), q)


def masked_row_quantile(x: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile of the entries where ``valid`` is True, interpolated linearly as `torch.quantile`.

    x, valid: (..., n). Returns (..., 1); +inf for a row with no valid entry (so nothing lies below it
    that is not masked out by ``valid`` anyway). Rows may hold different numbers of valid entries, e.g.
    samples of a batch with different image token counts. Half-precision ``x`` (bf16/fp16, such as attention maps
    of a half model) is interpolated in float32 and the quantile returned in float32: rounded to the half dtype,
    it can fall onto its lower order statistic and keep that entry from lying below it.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    plan = quantile_plan(valid.sum(dim=-1, keepdim=True), q, x.dtype)
    return planned_quantile(x.masked_fill(~valid, float("inf")).sort(dim=-1).values, plan)


QuantilePlan = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def quantile_plan(count: torch.Tensor, q: float, dtype: torch.dtype) -> QuantilePlan:
    """Where a row's q-quantile lies among its ``count`` (..., 1) valid entries once they are sorted first:
    (lower index, upper index, interpolation weight in ``dtype``, row has an entry). It depends on the counts
    only, so CMAI computes it once per generation and layer gamma rather than once per layer call."""
    rank = q * (count - 1).clamp_min(0).to(torch.float64)
    lo, hi = rank.floor(), rank.ceil()
    return lo.long(), hi.long(), (rank - lo).to(dtype), count > 0


def host_quantile_plan(count: int, q: float) -> tuple[int, int, float]:
    """`quantile_plan` for one count known on the host, in Python numbers (the same float64 arithmetic): lower and
    upper index and the weight (as float64; `quantile_plan` rounds it to its dtype). No tensor, so no device work."""
    rank = q * float(max(count - 1, 0))
    lower = math.floor(rank)
    return lower, math.ceil(rank), rank - lower


def planned_quantile(ascending: torch.Tensor, plan: QuantilePlan) -> torch.Tensor:
    """The quantile (..., 1) of rows ``ascending`` (..., n) sorted with their valid entries first (invalid ones
    +inf); ``plan``'s tensors may broadcast over leading dimensions (they are expanded here)."""
    shape = (*ascending.shape[:-1], 1)
    lo, hi, weight, nonempty = (t if t.shape == shape else t.expand(shape) for t in plan)
    value = torch.lerp(ascending.gather(-1, lo), ascending.gather(-1, hi), weight)
    return torch.where(nonempty, value, float("inf"))


def inhibition_mask(focus: torch.Tensor, gamma: float) -> torch.Tensor:
    """Boolean mask, True where a (text, image) pair is inhibited: F strictly below the row's gamma-quantile.

    focus: (..., m, n). gamma in [0, 1); gamma = 0 inhibits nothing.
    """
    check_gamma(gamma)
    if gamma == 0 or focus.shape[-1] == 0:
        return torch.zeros_like(focus, dtype=torch.bool)
    return focus < row_quantile(focus, float(gamma))


def gamma_schedule(
    num_layers: int,
    gamma_max: float = 0.6,
    layers: Sequence[int] | None = None,
    gammas: Sequence[float] | None = None,
) -> dict[int, float]:
    """Gamma per active LLM layer: ``gamma_max * l / (num_layers - 1)`` (0 at the first layer), or ``gammas``."""
    check_gamma(gamma_max, "gamma_max")
    layers = list(range(num_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"CMAI layers {bad} do not exist in an LLM with {num_layers} layers.")
    if gammas is not None:
        if len(gammas) != len(layers):
            raise ValueError(f"got {len(gammas)} gammas for {len(layers)} CMAI layers; give one per layer.")
        for g in gammas:
            check_gamma(g, "gammas")
        return dict(zip(layers, (float(g) for g in gammas), strict=True))
    denom = max(num_layers - 1, 1)
    return {layer: gamma_max * layer / denom if num_layers > 1 else gamma_max for layer in layers}
