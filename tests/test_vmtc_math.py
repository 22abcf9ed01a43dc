"""VMTC's pure functions: compress layout, budgets, merging (Eq. 5-8) and K-means."""

import pytest
import torch

from unclutter import kmeans, vmtc


def make(b=2, n=20, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1 + n, d, generator=g)
    imp = torch.rand(b, n, generator=g)
    return x, imp / imp.sum(-1, keepdim=True)


def naive_compress(x, imp, keep, cluster_of, normalize=True):
    """Eq. 5-8 for one image, given the cluster assignment of each redundant patch."""
    n = imp.shape[0]
    ranked = sorted(range(n), key=lambda i: (-imp[i].item(), i))
    kept = sorted(ranked[:keep])
    redundant = sorted(ranked[keep:])
    out = [x[0]] + [x[1 + i] for i in kept]
    for c in range(max(cluster_of) + 1 if cluster_of else 0):
        members = [j for j, cj in zip(redundant, cluster_of, strict=True) if cj == c]
        s = sum(imp[j] * x[1 + j] for j in members)  # Eq. 7
        out.append(s / sum(imp[j] for j in members) if normalize else s)
    return torch.stack(out), kept, redundant


@pytest.mark.parametrize("normalize", [True, False])
def test_compress_equals_paper_equations(normalize):
    x, imp = make()
    tokens, info = vmtc.compress(x, imp, keep=8, clusters=4, normalize=normalize)
    assert tokens.shape == (2, 1 + 8 + 4, 8)
    for b in range(2):
        ref, kept, redundant = naive_compress(x[b], imp[b], 8, info.cluster[b].tolist(), normalize)
        assert info.kept_index[b].tolist() == kept
        assert info.merged_index[b].tolist() == redundant
        torch.testing.assert_close(tokens[b], ref)


def test_compress_keeps_top_k_by_importance():
    x, imp = make(n=30)
    _, info = vmtc.compress(x, imp, keep=10, clusters=3)
    for b in range(2):
        top = set(torch.topk(imp[b], 10).indices.tolist())
        assert set(info.kept_index[b].tolist()) == top
        assert sorted(info.kept_index[b].tolist() + info.merged_index[b].tolist()) == list(range(30))


def test_every_cluster_nonempty_and_ids_in_range():
    x, imp = make(b=4, n=50)
    _, info = vmtc.compress(x, imp, keep=10, clusters=12)
    for b in range(4):
        assert sorted(set(info.cluster[b].tolist())) == list(range(12))


def test_merge_variants():
    x, imp = make()
    t, info = vmtc.compress(x, imp, keep=5, clusters=99, merge="single")
    assert t.shape[1] == 1 + 5 + 1 and set(info.cluster.flatten().tolist()) == {0}
    t, info = vmtc.compress(x, imp, keep=5, clusters=99, merge="drop")
    assert t.shape[1] == 1 + 5 and set(info.cluster.flatten().tolist()) == {-1}
    torch.testing.assert_close(t[:, 1:], x[:, 1:].gather(1, info.kept_index[..., None].expand(-1, -1, 8)))


def test_compress_rejects_impossible_budgets():
    x, imp = make(n=10)
    with pytest.raises(ValueError, match="keep must be in"):
        vmtc.compress(x, imp, keep=11, clusters=1)
    with pytest.raises(ValueError, match="redundant patches"):
        vmtc.compress(x, imp, keep=8, clusters=3)
    with pytest.raises(ValueError, match="no patch token"):
        vmtc.compress(x, imp, keep=0, clusters=0, merge="drop")
    with pytest.raises(ValueError, match="CLS first"):
        vmtc.compress(x, imp[:, :5], keep=1, clusters=1)


def test_zero_importance_falls_back_to_plain_mean():
    x, _ = make(b=1, n=6)
    imp = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    tokens, _ = vmtc.compress(x, imp, keep=2, clusters=1)
    torch.testing.assert_close(tokens[0, -1], x[0, 3:].mean(0))
    assert torch.isfinite(tokens).all()


def test_cls_importance_equals_attention_row():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 11, 4, generator=g), torch.randn(2, 3, 11, 4, generator=g)
    probs = ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1)
    torch.testing.assert_close(vmtc.cls_importance(q, k, 0.5), probs.mean(1)[:, 0, 1:])


def test_kmeans_deterministic_nonempty_and_batched_equals_single():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, 6, generator=g)
    a = kmeans.cosine_kmeans(x, 7)
    assert torch.equal(a, kmeans.cosine_kmeans(x, 7))
    for b in range(3):
        assert torch.equal(a[b], kmeans.cosine_kmeans(x[b : b + 1], 7)[0])
        assert set(a[b].tolist()) == set(range(7))


def test_kmeans_reseeds_empty_clusters_on_duplicates():
    x = torch.ones(2, 10, 4)  # every point identical: Lloyd would leave clusters empty
    x[:, 7:] += torch.randn(2, 3, 4) * 1e-3
    a = kmeans.cosine_kmeans(x, 5)
    for b in range(2):
        assert set(a[b].tolist()) == set(range(5))
    assert set(kmeans.cosine_kmeans(torch.randn(1, 5, 3), 5)[0].tolist()) == set(range(5))


def _greedy_fill(assign: torch.Tensor, sim: torch.Tensor, c: int) -> torch.Tensor:
    """The empty-cluster fix as a loop: while a cluster is empty, move the worst-fitting point (lowest similarity
    to its centroid, lower index on ties) of a cluster with more than one member into the lowest empty cluster."""
    assign = assign.clone()
    for b in range(assign.shape[0]):
        while empties := [k for k in range(c) if not (assign[b] == k).any()]:
            movable = [i for i in range(assign.shape[1]) if (assign[b] == assign[b, i]).sum() > 1]
            worst = min(movable, key=lambda i: (float(sim[b, i]), i))
            assign[b, worst] = empties[0]
    return assign


def test_empty_cluster_fill_equals_the_greedy_loop():
    g = torch.Generator().manual_seed(5)
    for _ in range(150):
        r = int(torch.randint(2, 25, (1,), generator=g))
        c = int(torch.randint(1, r + 1, (1,), generator=g))
        used = int(torch.randint(1, c + 1, (1,), generator=g))  # clusters left non-empty
        assign = torch.randperm(c, generator=g)[torch.randint(0, used, (3, r), generator=g)]
        sim = torch.randint(-2, 3, (3, r), generator=g) / 2.0  # coarse values: many ties
        assert torch.equal(kmeans._fill_empty_clusters(assign, sim, c), _greedy_fill(assign, sim, c))


def test_kmeans_compiles_to_one_graph_with_the_eager_clusters():
    """Under torch.compile K-means reads nothing back to the host (a read breaks the graph, and a CUDA-graph capture
    fails on it); it runs every iteration instead of stopping early and gives the eager clusters."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    cases = [(torch.randn(2, 40, 6, generator=g), 7, 10), (torch.randn(2, 40, 6, generator=g), 7, 2)]
    dup = torch.randn(2, 40, 6, generator=g)
    dup[:, :30] = dup[:, :1]  # duplicates leave clusters empty
    cases.append((dup, 7, 10))
    compiled = torch.compile(kmeans.cosine_kmeans, fullgraph=True, backend="aot_eager", dynamic=False)
    for x, c, iters in cases:
        got = compiled(x, c, iters)  # fullgraph: a graph break raises
        assert torch.equal(got, kmeans.cosine_kmeans(x, c, iters))
        assert all(set(row.tolist()) == set(range(c)) for row in got)
    torch._dynamo.reset()


def test_kmeans_separates_obvious_groups():
    base = torch.eye(3)
    x = torch.cat([base[i].repeat(5, 1) + 0.01 * torch.randn(5, 3) for i in range(3)])[None]
    a = kmeans.cosine_kmeans(x, 3)[0]
    groups = {tuple(a[i * 5 : (i + 1) * 5].tolist()) for i in range(3)}
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 3


def test_stage_layers_and_counts():
    assert vmtc.feature_block(24, -2) == 22 and vmtc.feature_block(24, 24) == 23
    assert vmtc.stage_layers(22, 1) == [22]
    layers = vmtc.stage_layers(22, 4)
    assert layers[-1] == 22 and len(set(layers)) == 4 and layers == sorted(layers)
    counts = vmtc.stage_token_counts(576, 288, 4)
    assert counts[-1] == 288 and counts == sorted(counts, reverse=True) and counts[0] < 576
    assert vmtc.stage_token_counts(576, 36, 4) == [288, 144, 72, 36]
    with pytest.raises(ValueError, match="exceeds"):
        vmtc.stage_layers(2, 5)


def test_pure_functions_ignore_a_callers_bf16_autocast():
    """Ranking, K-means and merging give bit-identical results inside ``torch.autocast(bf16)``."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 33, 16, generator=g), torch.randn(2, 4, 33, 16, generator=g)
    x = torch.randn(2, 33, 24, generator=g)

    def run():
        imp = vmtc.cls_importance(q, k, 0.25)
        tokens, info = vmtc.compress(x, imp, keep=12, clusters=5)
        received = vmtc.received_importance(q, k, 0.25, chunk=7)
        return imp, tokens, info.cluster, kmeans.cosine_kmeans(x[:, 1:], 6), received

    reference = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run()
        assert (q @ k.transpose(-1, -2)).dtype == torch.bfloat16  # autocast is really on here
    for want, got in zip(reference, mixed, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def naive_received(q, k, scale, valid):
    """Mean over heads and valid queries of the softmax attention each valid key receives, one image at a time."""
    out = torch.zeros(q.shape[0], q.shape[2])
    for b in range(q.shape[0]):
        idx = valid[b].nonzero().flatten()
        a = ((q[b][:, idx].double() @ k[b][:, idx].double().transpose(-1, -2)) * scale).softmax(-1)
        out[b, idx] = a.mean(dim=(0, 1)).float()
    return out


# chunks of score rows (heads x queries): part of a head, one head, two of three heads (a short last group), all
@pytest.mark.parametrize("chunk", [1, 5, 37, 64, 74, 4096, None])
def test_received_importance_equals_full_attention_in_any_chunking(chunk):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 37, 8, generator=g), torch.randn(2, 3, 37, 8, generator=g)
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[1, 30:] = False  # padding patches (Idefics3's patch mask): neither queries nor keys
    got = vmtc.received_importance(q, k, 0.3, valid=valid, chunk=chunk)
    torch.testing.assert_close(got, naive_received(q, k, 0.3, valid), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(2))
    assert got.dtype == torch.float32 and (got[1, 30:] == 0).all()
    torch.testing.assert_close(
        vmtc.received_importance(q, k, 0.3, chunk=chunk), naive_received(q, k, 0.3, valid | True)
    )


@pytest.mark.parametrize("chunk", [3, 41, 82, None])
def test_attention_with_received_equals_sdpa_and_the_score_pass(chunk):
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 41, 8, generator=g) for _ in range(3))
    out, received = vmtc.attention_with_received(q, k, v, 0.35, chunk=chunk)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.35))
    torch.testing.assert_close(received, naive_received(q, k, 0.35, torch.ones(2, 41, dtype=torch.bool)))
    half, _ = vmtc.attention_with_received(q, k, v.bfloat16(), 0.35)
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("chunk", [5, 37, None])
def test_received_ranking_is_differentiable_like_full_attention(chunk):
    """A trained tower backpropagates through the fused stage attention and its ranking (the in-place exponent
    failed in backward): gradients of both outputs equal those of plain softmax attention."""
    g = torch.Generator().manual_seed(8)
    leaves = [torch.randn(2, 3, 37, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]
    probe_out, probe_imp = torch.randn(2, 3, 37, 8, generator=g), torch.randn(2, 37, generator=g)
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[1, 30:] = False

    def grads(fn):
        q, k, v = (x.float() for x in leaves)
        out, imp, imp_masked = fn(q, k, v)
        loss = (out * probe_out).sum() + (imp * probe_imp).sum() + (imp_masked * probe_imp).sum()
        return torch.autograd.grad(loss, leaves)

    def ours(q, k, v):
        out, imp = vmtc.attention_with_received(q, k, v, 0.3, chunk=chunk)
        return out, imp, vmtc.received_importance(q, k, 0.3, valid=valid, chunk=chunk)

    def reference(q, k, v):
        probs = ((q @ k.transpose(-1, -2)) * 0.3).softmax(-1)
        bias = torch.zeros(2, 1, 1, 37).masked_fill(~valid[:, None, None], float("-inf"))
        masked = ((q @ k.transpose(-1, -2)) * 0.3 + bias).softmax(-1) * valid[:, None, :, None]
        imp_masked = masked.sum(dim=(1, 2)) / (3 * valid.sum(1, keepdim=True))
        return probs @ v, probs.mean(dim=(1, 2)), imp_masked

    for got, want in zip(grads(ours), grads(reference), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_received_importance_is_stable_for_large_logits():
    """Scores of several hundred (attention sinks in trained towers) must not overflow the in-place exponent."""
    g = torch.Generator().manual_seed(6)
    q, k = 30 * torch.randn(1, 2, 50, 8, generator=g), 30 * torch.randn(1, 2, 50, 8, generator=g)
    got = vmtc.received_importance(q, k, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, naive_received(q, k, 1.0, torch.ones(1, 50, dtype=torch.bool)))


def test_compress_without_cls_keeps_whole_units():
    """Units of u patches (Qwen's 2x2 merge): compress (B, N/u, u*D) views, every output token a whole unit."""
    g = torch.Generator().manual_seed(4)
    u, units, d = 4, 12, 3
    x = torch.randn(2, units * u, d, generator=g)
    patch_imp = torch.rand(2, units * u, generator=g)
    unit_imp = patch_imp.view(2, units, u).mean(-1)
    tokens, info = vmtc.compress(x.view(2, units, u * d), unit_imp, keep=5, clusters=2, has_cls=False)
    assert tokens.shape == (2, 7, u * d)
    for b in range(2):
        ref, kept, redundant = naive_compress(
            torch.cat([torch.zeros(1, u * d), x[b].view(units, u * d)]), unit_imp[b], 5, info.cluster[b].tolist()
        )
        assert info.kept_index[b].tolist() == kept
        torch.testing.assert_close(tokens[b], ref[1:])
    with pytest.raises(ValueError, match=r"expects x \(B, N, D\)"):
        vmtc.compress(x, patch_imp[:, 1:], keep=5, clusters=2, has_cls=False)


def test_kmeans_under_autograd_after_a_run_in_inference_mode():
    """K-means caches its initial indices per shape; one built inside ``torch.inference_mode`` (generation) must
    still serve a later call that autograd tracks (training, pictures)."""
    shape = (1, 37, 8)  # a shape no other test uses, so the cache is built here
    with torch.inference_mode():
        kmeans.cosine_kmeans(torch.randn(shape), 5)
    x = torch.randn(shape, requires_grad=True)
    assign = kmeans.cosine_kmeans(x, 5)
    assert sorted(set(assign[0].tolist())) == list(range(5))


def test_kmeans_initial_centroids_agree_on_host_and_device():
    for r, c in [(5, 5), (40, 7), (576, 72), (3, 1), (1000, 999)]:
        assert kmeans._spread_index(r, c, torch.device("cpu")).tolist() == kmeans._spread(r, c, "cpu").tolist()
