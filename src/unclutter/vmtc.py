"""Visual-modality token compression (VMTC), the pure tensor part (paper Eq. 5-8).

Inside a ViT block, between self-attention and MLP: rank patch tokens by the CLS token's
head-averaged attention (importance, IPS), keep CLS + the top-k patches, cluster the remaining
("redundant") tokens with cosine K-means and merge each cluster into one token, weighted by IPS.

Towers without a CLS token (SigLIP, Qwen's ViT) rank by `received_importance` instead: the mean
attention each patch receives from all patches (our extension of Eq. 5-6; VisionZip uses the same
signal). Towers that merge patches after the tower (Qwen's 2x2, pixel shuffle, Gemma 3's pooling)
compress whole units: view (B, N, D) as (B, N/u, u*D), rank units by their patches' mean importance,
and `compress` with ``has_cls=False``; every output token is then a complete unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._amp import autocast_off
from .kmeans import cosine_kmeans


@dataclass
class VMTCInfo:
    """What one compression step did, per image. Indices refer to the step's input patches 0..N-1.

    kept_index: (B, k) ascending indices of kept patches.
    merged_index: (B, N-k) ascending indices of the redundant patches.
    cluster: (B, N-k) cluster id of each redundant patch (0..c-1; -1 when merge="drop").
    importance: (B, N) the IPS used for ranking and merging.
    """

    kept_index: torch.Tensor
    merged_index: torch.Tensor
    cluster: torch.Tensor
    importance: torch.Tensor

    @property
    def num_clusters(self) -> int:
        return int(self.cluster.max().item()) + 1 if self.cluster.numel() else 0

    def select(self, rows: slice | int) -> VMTCInfo:
        """The same step for some batch rows only (an int keeps that one row, as a batch of one)."""
        rows = slice(rows, rows + 1) if isinstance(rows, int) else rows
        return VMTCInfo(self.kept_index[rows], self.merged_index[rows], self.cluster[rows], self.importance[rows])


@autocast_off
def cls_importance(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-averaged softmax attention of the CLS query (position 0) to every patch key.

    query, key: (B, H, 1+N, Dh) or (B, H, 1, Dh) for the query. Returns (B, N) in float32; each
    row sums to 1 - (CLS self-attention), exactly the patch part of the CLS attention row.
    """
    logits = (query[:, :, :1].float() @ key.float().transpose(-1, -2)) * scale  # (B, H, 1, 1+N)
    return logits.softmax(dim=-1).mean(dim=1)[:, 0, 1:]


def _score_chunks(query: torch.Tensor, key: torch.Tensor, scale: float, valid: torch.Tensor | None, chunk: int | None):
    """Yield (heads, start, scores, weight) per chunk of score rows: the query rows ``start:start + c`` of the heads
    ``heads`` (a slice); scores (B, h, c, T) are exp(logit - row max) in float32, weight (B, h, c, 1) is 1 / row sum
    (0 for padding queries), so ``scores * weight`` is those rows' softmax attention.

    ``chunk`` bounds the rows per chunk (heads x queries): a chunk of at least T rows takes whole heads, a smaller
    one part of one head. By default a chunk's scores fill about 2 MiB on CPU, where they then stay in a core's
    cache between the products that write and read them (Gemma 3's 16 x 4,096: about 1.3 s against 1.9 s for 64 MiB
    chunks, one thread), and 1 GiB on an accelerator, where each chunk costs ~10 kernel launches and those dominate
    (Gemma 3's 4,096 patches: one chunk)."""
    bsz, heads, t, _ = query.shape
    if chunk is None:
        budget = 1 << 19 if query.device.type == "cpu" else 1 << 28
        chunk = budget // max(1, bsz * t)
    chunk = max(1, chunk)
    per_head, group = (t, chunk // t) if chunk >= t else (chunk, 1)
    keys = key.float().transpose(-1, -2)  # (B, H, Dh, T)
    key_bias = None
    if valid is not None:
        key_bias = torch.zeros(bsz, 1, 1, t, device=query.device).masked_fill(~valid[:, None, None, :], float("-inf"))
    # under autograd (a tower being trained) every step is out of place: backward needs the tensors it saved
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    for h in range(0, heads, group):
        hs = slice(h, h + group)
        for start in range(0, t, per_head):
            scores = (query[:, hs, start : start + per_head].float() * scale) @ keys[:, hs]  # (B, h, c, T) logits
            if grad:
                if key_bias is not None:
                    scores = scores + key_bias
                scores = (scores - scores.amax(dim=-1, keepdim=True).detach()).exp()  # the shift needs no gradient
                weight = scores.sum(dim=-1, keepdim=True).reciprocal()
            else:
                if key_bias is not None:
                    scores += key_bias
                scores -= scores.amax(dim=-1, keepdim=True)
                scores.exp_()  # in place: one (B, h, c, T) buffer per chunk
                weight = scores.sum(dim=-1, keepdim=True).reciprocal_()
            if valid is not None:
                weight = weight * valid[:, None, start : start + per_head, None]  # padding queries give nothing
            yield hs, start, scores, weight
            # drop this chunk before the next one is computed (the caller drops its references too): else two
            # chunks are alive at once, twice the budget (2 GiB on an accelerator)
            del scores, weight


@autocast_off
def received_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    *,
    valid: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean head-averaged softmax attention each token receives from all (valid) query tokens.

    query, key: (B, H, T, Dh). valid: optional (B, T) bool, False for padding patches (neither queries
    nor keys). Returns (B, T) float32 summing to 1 over the valid tokens of each image. Score rows (heads x
    queries) are processed ``chunk`` at a time (default: about 2 MiB of scores on CPU, 1 GiB on an accelerator;
    see `_score_chunks`), so a long sequence (Gemma 3: 4,096 patches) never materialises the full (H, T, T)
    attention; each chunk is exponentiated in place and summed over its rows by one matrix product with the rows'
    1 / sum. `attention_with_received` also returns the attention output.
    """
    bsz, heads, t, _ = query.shape
    received = torch.zeros(bsz, 1, t, dtype=torch.float32, device=query.device)
    for _, _, scores, weight in _score_chunks(query, key, scale, valid, chunk):
        received += (weight.transpose(-1, -2) @ scores).sum(dim=1)  # sum_i p_ij over the chunk's queries and heads
        del scores, weight  # one chunk alive at a time (see `_score_chunks`)
    queries = valid.sum(dim=1, keepdim=True).clamp_min(1) if valid is not None else t
    return received[:, 0] / (heads * queries)


@autocast_off
def attention_with_received(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, *, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's softmax attention and `received_importance` from one pass over its scores (no mask).

    query, key, value: (B, H, T, Dh). Returns the attention output (B, H, T, Dh) in ``value``'s dtype (computed
    in float32) and the (B, T) float32 importance, equal to ``received_importance(query, key, scale)``. A VMTC
    stage block computes its attention with this instead of attention plus a second score pass.
    """
    bsz, heads, t, _ = query.shape
    out = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    received = torch.zeros(bsz, 1, t, dtype=torch.float32, device=query.device)
    values = value.float()
    for hs, start, scores, weight in _score_chunks(query, key, scale, None, chunk):
        received += (weight.transpose(-1, -2) @ scores).sum(dim=1)
        out[:, hs, start : start + scores.shape[2]] = ((scores @ values[:, hs]) * weight).to(value.dtype)
        del scores, weight  # one chunk alive at a time (see `_score_chunks`)
    return out, received[:, 0] / (heads * t)


@autocast_off
def compress(
    x: torch.Tensor,
    importance: torch.Tensor,
    keep: int,
    clusters: int,
    *,
    merge: str = "cluster",
    normalize: bool = True,
    iters: int = 10,
    has_cls: bool = True,
) -> tuple[torch.Tensor, VMTCInfo]:
    """Keep CLS + top-``keep`` patches, merge the rest into ``clusters`` tokens.

    Args:
        x: (B, 1+N, D) tokens, CLS first; (B, N, D) with ``has_cls=False`` (towers without CLS, units).
        importance: (B, N) IPS of each patch.
        keep: number of patches kept (k).
        clusters: number of merged tokens (c); ignored for merge="single" (1) and "drop" (0).
        merge: "cluster" (K-means then merge), "single" (one merged token), "drop" (no merged token).
        normalize: importance-weighted mean (True) or Eq. 7's unnormalised weighted sum (False).
        iters: K-means iterations.

    Returns:
        tokens: (B, 1+k+c, D) laid out as [CLS, kept patches in patch order, cluster 0..c-1]
            ((B, k+c, D) without CLS).
        info: `VMTCInfo`.
    """
    lead = 1 if has_cls else 0
    if x.dim() != 3 or importance.dim() != 2 or importance.shape != (x.shape[0], x.shape[1] - lead):
        layout = "(B, 1+N, D) with CLS first" if has_cls else "(B, N, D)"
        raise ValueError(
            f"compress expects x {layout} and importance (B, N); got {tuple(x.shape)} and {tuple(importance.shape)}."
        )
    n = importance.shape[1]
    c = {"cluster": clusters, "single": 1, "drop": 0}.get(merge)
    if c is None:
        raise ValueError(f"merge must be 'cluster', 'single' or 'drop', got {merge!r}.")
    if not 0 <= keep <= n:
        raise ValueError(f"keep must be in [0, {n}] patches, got {keep}.")
    if c > n - keep or (merge == "cluster" and c < 1):
        raise ValueError(
            f"cannot make {c} merged tokens from {n - keep} redundant patches (N={n}, keep={keep}); "
            "lower the cluster count or keep fewer patches."
        )
    if keep + c < 1:
        raise ValueError("compress would return no patch token; keep at least one patch or one cluster.")

    order = torch.sort(importance, dim=1, descending=True, stable=True).indices  # ties: lower index first
    kept_index = order[:, :keep].sort(dim=1).values
    merged_index = order[:, keep:].sort(dim=1).values
    patches = x[:, lead:]
    d = x.shape[-1]
    kept = patches.gather(1, kept_index.unsqueeze(-1).expand(-1, -1, d))
    pieces = [x[:, :1], kept] if has_cls else [kept]

    if c == 0:
        cluster = torch.full_like(merged_index, -1)
    else:
        redundant = patches.gather(1, merged_index.unsqueeze(-1).expand(-1, -1, d))
        cluster = cosine_kmeans(redundant, c, iters) if merge == "cluster" else torch.zeros_like(merged_index)
        weight = importance.gather(1, merged_index).float()  # (B, R)
        one_hot = torch.nn.functional.one_hot(cluster, c).to(weight.dtype)  # (B, R, c)
        w = one_hot * weight.unsqueeze(-1)
        merged = w.transpose(1, 2) @ redundant.float()  # (B, c, D): sum_j IPS_j z_j  (Eq. 7)
        if normalize:
            mass = w.sum(dim=1).unsqueeze(-1)  # (B, c, 1)
            count = one_hot.sum(dim=1).unsqueeze(-1)
            plain_mean = (one_hot.transpose(1, 2) @ redundant.float()) / count
            # A zero mass (IPS underflow in low precision) falls back to the plain mean.
            merged = torch.where(mass > 0, merged / mass.clamp_min(torch.finfo(mass.dtype).tiny), plain_mean)
        pieces.append(merged.to(x.dtype))
    info = VMTCInfo(kept_index=kept_index, merged_index=merged_index, cluster=cluster, importance=importance)
    return torch.cat(pieces, dim=1), info


def output_importance(info: VMTCInfo) -> torch.Tensor:
    """(B, k + c) importance of the tokens `compress` returned (CLS excluded): a kept patch keeps its IPS, a merged
    token gets the sum of its members' IPS (its share of the attention), so merging merged tokens again with these
    weights equals one importance-weighted merge of the original patches."""
    kept = info.importance.gather(1, info.kept_index)
    c = info.num_clusters
    if c == 0:
        return kept
    merged = info.importance.gather(1, info.merged_index)
    sums = torch.zeros(kept.shape[0], c, dtype=merged.dtype, device=merged.device)
    return torch.cat([kept, sums.scatter_add(1, info.cluster, merged)], dim=1)


def feature_block(num_layers: int, vision_feature_layer: int) -> int:
    """0-based index of the ViT block whose output is ``hidden_states[vision_feature_layer]``."""
    h = vision_feature_layer if vision_feature_layer >= 0 else num_layers + 1 + vision_feature_layer
    if not 1 <= h <= num_layers:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} selects the embeddings or no block of a "
            f"{num_layers}-block tower; VMTC needs a block output."
        )
    return h - 1


def stage_layers(last_block: int, num_stages: int) -> list[int]:
    """``num_stages`` equally spaced block indices in [0, last_block], the last one at ``last_block``."""
    if num_stages > last_block + 1:
        raise ValueError(f"num_stages={num_stages} exceeds the {last_block + 1} blocks up to the feature layer.")
    span = last_block + 1
    return [int(math.floor((s + 1) * span / num_stages + 0.5)) - 1 for s in range(num_stages)]


def stage_token_counts(num_patches: int, budget: int, num_stages: int) -> list[int]:
    """Patch tokens after each stage: a geometric decay from ``num_patches`` to exactly ``budget``."""
    counts = [int(round(num_patches * (budget / num_patches) ** ((s + 1) / num_stages))) for s in range(num_stages)]
    counts[-1] = budget
    for i in range(num_stages - 2, -1, -1):  # monotone and feasible after rounding
        counts[i] = min(max(counts[i], counts[i + 1]), num_patches)
    return counts


def default_clusters(tokens_after: int) -> int:
    """Default K-means cluster count for a stage that outputs ``tokens_after`` patch tokens."""
    return max(1, tokens_after // 8)
