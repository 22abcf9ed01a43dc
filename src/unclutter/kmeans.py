"""Batched cosine (spherical) K-means in plain torch, with no empty clusters.

Every image in the batch gets exactly ``c`` non-empty clusters, so merged token counts are equal
across the batch and tensors stay rectangular. Initialisation is deterministic (evenly spaced
points in input order), so the same input always yields the same clustering on any device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._amp import autocast_off


def _cluster_sizes(assign: torch.Tensor, c: int) -> torch.Tensor:
    """(B, c) members per cluster of assignments ``assign`` (B, R)."""
    sizes = torch.zeros(assign.shape[0], c, dtype=torch.long, device=assign.device)
    return sizes.scatter_add_(1, assign, torch.ones_like(assign))


def _fill_empty_clusters(assign: torch.Tensor, sim_to_own: torch.Tensor, c: int) -> torch.Tensor:
    """Move the worst-fitting point of a multi-member cluster into each empty cluster.

    assign: (B, R) cluster ids; sim_to_own: (B, R) cosine similarity of each point to its centroid.
    Requires R >= c. One empty cluster per image is filled per pass; at most ``c`` passes.
    """
    b_idx = torch.arange(assign.shape[0], device=assign.device)
    for _ in range(c):
        counts = _cluster_sizes(assign, c)
        empty = counts == 0
        needs = empty.any(dim=1)
        if not bool(needs.any()):
            break
        target = empty.long().argmax(dim=1)  # first empty cluster per image
        movable = counts.gather(1, assign) > 1  # never empty another cluster
        score = sim_to_own.masked_fill(~movable, float("inf"))
        donor = score.argmin(dim=1)
        new_ids = torch.where(needs, target, assign[b_idx, donor])
        assign = assign.clone()
        assign[b_idx, donor] = new_ids
        sim_to_own = sim_to_own.clone()
        sim_to_own[b_idx, donor] = torch.where(needs, torch.ones_like(sim_to_own[:, 0]), sim_to_own[b_idx, donor])
    return assign


@autocast_off
def cosine_kmeans(x: torch.Tensor, c: int, iters: int = 10) -> torch.Tensor:
    """Cluster points by cosine similarity.

    Args:
        x: (B, R, D) points; R >= c.
        c: number of clusters (>= 1).
        iters: maximum Lloyd iterations; stops early once no assignment changes.

    Returns:
        (B, R) long cluster ids in [0, c), every id used at least once in every row.
    """
    bsz, r, _ = x.shape
    if c < 1 or r < c:
        raise ValueError(f"cosine_kmeans needs 1 <= clusters <= points, got {c} clusters for {r} points.")
    xn = F.normalize(x.float(), dim=-1)
    if c == 1:
        return torch.zeros(bsz, r, dtype=torch.long, device=x.device)
    centroids = xn[:, _spread(r, c, x.device)]
    # a last column of ones: one scatter gives each cluster's sum and its member count (on a GPU every kernel
    # launch counts, and an iteration needs both)
    counted = torch.cat([xn, torch.ones_like(xn[..., :1])], dim=-1)
    assign = None
    for _ in range(iters):
        sim = xn @ centroids.transpose(1, 2)  # (B, R, c)
        best, new_assign = sim.max(dim=-1)
        sums = _cluster_sums(counted, new_assign, c)
        # "any cluster empty?" and "any assignment changed?" in one device->host copy: on a GPU each copy
        # stalls the launch queue, and an iteration needs both answers
        flags = [(sums[..., -1] == 0).any()] + ([] if assign is None else [(new_assign != assign).any()])
        empty, *changed = torch.stack(flags).tolist()
        if empty:  # rare: fix, then compare again
            new_assign = _fill_empty_clusters(new_assign, best, c)
            changed = [] if assign is None else [not torch.equal(new_assign, assign)]
            sums = _cluster_sums(counted, new_assign, c)
        if changed and not changed[0]:
            break
        assign = new_assign
        centroids = F.normalize(sums[..., :-1], dim=-1)
    return assign


def _cluster_sums(points: torch.Tensor, assign: torch.Tensor, c: int) -> torch.Tensor:
    """(B, c, D) sums of the points (B, R, D) assigned to each of ``c`` clusters by ``assign`` (B, R)."""
    sums = torch.zeros(points.shape[0], c, points.shape[-1], dtype=points.dtype, device=points.device)
    return sums.scatter_add_(1, assign.unsqueeze(-1).expand_as(points), points)


@functools.lru_cache(maxsize=256)
def _spread(r: int, c: int, device: torch.device) -> torch.Tensor:
    """The initial centroids' indices: ``c`` evenly spaced, distinct points of ``r`` (built once per shape; a
    normal tensor even when first built under inference mode, since later calls may be tracked by autograd)."""
    with torch.inference_mode(False):
        return torch.tensor([((2 * i + 1) * r) // (2 * c) for i in range(c)], device=device)
