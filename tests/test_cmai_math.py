"""CMAI's pure functions against naive loops written from the paper's Eq. 9-11."""

import pytest
import torch

from unclutter import cmai


def naive_focus(a_t2t: torch.Tensor, a_t2i: torch.Tensor) -> torch.Tensor:
    m, n = a_t2i.shape
    f = torch.zeros(m, n, dtype=torch.float64)
    for j in range(m):
        for k in range(n):
            acc = 0.0
            for h in range(m):
                a_t2n = a_t2t[j, h] if j > h else 0.0  # Eq. 9
                acc += a_t2n * a_t2i[h, k]  # Eq. 10
            f[j, k] = acc + a_t2i[j, k]  # Eq. 11
    return f


def random_attention(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(m, n + m, generator=g, dtype=torch.float64)
    a = a / a.sum(-1, keepdim=True)
    return a[:, n:], a[:, :n]


@pytest.mark.parametrize("m,n,seed", [(1, 5, 0), (4, 9, 1), (7, 16, 2)])
def test_focus_scores_equal_naive_loops(m, n, seed):
    a_t2t, a_t2i = random_attention(m, n, seed)
    torch.testing.assert_close(cmai.focus_scores(a_t2t, a_t2i), naive_focus(a_t2t, a_t2i))


def test_focus_scores_ignore_diagonal_and_upper_triangle():
    a_t2t, a_t2i = random_attention(5, 6, 3)
    noisy = a_t2t + torch.triu(torch.full_like(a_t2t, 7.0))
    torch.testing.assert_close(cmai.focus_scores(noisy, a_t2i), cmai.focus_scores(a_t2t, a_t2i))


def test_focus_scores_batched_leading_dims():
    parts = [random_attention(4, 6, s) for s in range(6)]
    a_t2t = torch.stack([p[0] for p in parts]).view(2, 3, 4, 4)
    a_t2i = torch.stack([p[1] for p in parts]).view(2, 3, 4, 6)
    out = cmai.focus_scores(a_t2t, a_t2i)
    for i in range(6):
        torch.testing.assert_close(out.view(6, 4, 6)[i], naive_focus(*parts[i]))


def test_focus_variants():
    a_t2t, a_t2i = random_attention(5, 4, 4)
    torch.testing.assert_close(cmai.focus_scores(a_t2t, a_t2i, mode="tia"), a_t2i)
    torch.testing.assert_close(cmai.focus_scores(a_t2t, a_t2i, mode="sum"), a_t2i.cumsum(0))
    disc = cmai.focus_scores(a_t2t, a_t2i, mode="discounted", discount=0.5)
    expected = torch.stack([sum(0.5 ** (j - h) * a_t2i[h] for h in range(j + 1)) for j in range(5)])
    torch.testing.assert_close(disc, expected)
    with pytest.raises(ValueError, match="focus must be one of"):
        cmai.focus_scores(a_t2t, a_t2i, mode="nope")


def test_focus_shape_error():
    with pytest.raises(ValueError, match="a_t2t must be"):
        cmai.focus_scores(torch.rand(3, 4), torch.rand(3, 5))


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.37, 0.5, 0.6, 0.99])
@pytest.mark.parametrize("n", [1, 2, 7, 576])
def test_inhibition_mask_equals_quantile_threshold(gamma, n):
    focus = torch.rand(3, 5, n, generator=torch.Generator().manual_seed(n))
    # the definition in float64 (torch >= 2.14 rounds its float32 quantile past tied elements)
    expected = focus.double() < torch.quantile(focus.double(), gamma, dim=-1, keepdim=True)
    assert torch.equal(cmai.inhibition_mask(focus, gamma), expected)
    # roughly gamma of the keys are inhibited (exactly floor-ish for distinct values)
    if n > 1:
        frac = cmai.inhibition_mask(focus, gamma).float().mean().item()
        assert abs(frac - gamma) <= 1.0 / n + 1e-6


def test_row_quantile_equals_torch_quantile_with_ties():
    x = torch.tensor([[1.0, 1.0, 1.0, 2.0], [3.0, 0.0, 0.0, 3.0]])
    for q in (0.0, 0.25, 0.3, 0.6, 0.99):
        assert torch.equal(cmai.row_quantile(x, q), torch.quantile(x.double(), q, dim=-1, keepdim=True).float())
    assert not cmai.inhibition_mask(torch.ones(2, 8), 0.6).any()  # ties at the threshold are kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inhibition_mask_of_half_scores_equals_that_of_their_float32_values(dtype):
    """Half focus scores (a half model's attention maps) are ranked as the same values in float32: a quantile
    rounded to bf16 fell onto its lower order statistic, which then was not inhibited."""
    row = torch.tensor([[0.25, 1.0, 1.0078125]], dtype=dtype)  # 1.0 and 1.0078125: adjacent bf16 numbers
    assert torch.equal(cmai.inhibition_mask(row, 0.6), cmai.inhibition_mask(row.float(), 0.6))
    g = torch.Generator().manual_seed(0)
    for gamma in cmai.gamma_schedule(32, 0.6).values():
        focus = (torch.rand(64, 288, generator=g) * 4).softmax(-1).to(dtype)
        assert torch.equal(cmai.inhibition_mask(focus, gamma), cmai.inhibition_mask(focus.float(), gamma))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_focus_scores_of_half_attention_are_those_of_their_float32_values(dtype):
    a_t2t, a_t2i = (a.float().to(dtype) for a in random_attention(9, 20, 4))
    got = cmai.focus_scores(a_t2t, a_t2i)
    assert got.dtype == torch.float32 and torch.equal(got, cmai.focus_scores(a_t2t.float(), a_t2i.float()))


def test_masked_row_quantile_equals_quantile_of_each_rows_valid_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 9, generator=g)
    valid = torch.rand(6, 9, generator=g) > 0.4
    valid[0] = False  # a row with no valid entry: nothing can lie below its threshold
    valid[1] = True
    for q in (0.0, 0.3, 0.6, 0.95):
        got = cmai.masked_row_quantile(x, valid, q)
        assert got[0].item() == float("inf")
        for r in range(1, 6):
            ref = torch.quantile(x[r][valid[r]].double(), q).float()
            torch.testing.assert_close(got[r, 0], ref, atol=0, rtol=1e-6)


def test_gamma_zero_inhibits_nothing():
    assert not cmai.inhibition_mask(torch.rand(4, 10), 0.0).any()


@pytest.mark.parametrize("gamma", [-0.1, 1.0, 1.5, float("nan")])
def test_gamma_outside_unit_interval_rejected(gamma):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        cmai.inhibition_mask(torch.rand(2, 3), gamma)


def test_gamma_schedule_linear_over_depth():
    g = cmai.gamma_schedule(32, 0.6)
    assert g[0] == 0.0 and g[31] == pytest.approx(0.6)
    assert g[16] == pytest.approx(0.6 * 16 / 31)
    sub = cmai.gamma_schedule(32, 0.6, layers=[10, 31])
    assert sub == {10: pytest.approx(0.6 * 10 / 31), 31: pytest.approx(0.6)}
    assert cmai.gamma_schedule(4, layers=[1, 2], gammas=[0.2, 0.3]) == {1: 0.2, 2: 0.3}
    with pytest.raises(ValueError, match="one per layer"):
        cmai.gamma_schedule(4, layers=[1, 2], gammas=[0.2])
    with pytest.raises(ValueError, match="do not exist"):
        cmai.gamma_schedule(4, layers=[7])


def test_focus_scores_ignore_a_callers_bf16_autocast():
    a_t2t, a_t2i = (a.float() for a in random_attention(9, 20, 4))
    reference = cmai.focus_scores(a_t2t, a_t2i)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = cmai.focus_scores(a_t2t, a_t2i)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, reference)


def test_host_quantile_plan_is_quantile_plans_arithmetic():
    """CMAI's fast path takes the quantile positions as host numbers: the same indices and, once rounded to
    float32, the same weight as `quantile_plan`, for every count and every gamma of a 40-layer schedule."""
    gammas = [*cmai.gamma_schedule(40, 0.6).values(), 0.0, 0.5, 0.999]
    counts = torch.arange(0, 700)[:, None]
    for gamma in gammas:
        lower, upper, weight, _ = cmai.quantile_plan(counts, gamma, torch.float32)
        host = [cmai.host_quantile_plan(int(n), gamma) for n in counts[:, 0]]
        assert [h[0] for h in host] == lower[:, 0].tolist() and [h[1] for h in host] == upper[:, 0].tolist()
        assert torch.equal(torch.tensor([h[2] for h in host], dtype=torch.float32), weight[:, 0])
