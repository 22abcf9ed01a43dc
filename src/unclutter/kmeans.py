"""Batched cosine (spherical) K-means in plain torch, with no empty clusters.

Every image in the batch gets exactly ``c`` non-empty clusters, so merged token counts are equal
across the batch and tensors stay rectangular. Initialisation is deterministic (evenly spaced
points in input order), so the same input always yields the same clustering on any device.

Eagerly the Lloyd loop stops as soon as no assignment changes, which costs one device->host read per
iteration. Under ``torch.compile`` or CUDA-graph capture it reads nothing back: it runs every iteration and keeps
the assignment from the first one that changes nothing, so the whole tower can be captured as one graph. The
clusters are eager's given the same arithmetic (captured eager kernels, dynamo's aot_eager); inductor's fused
kernels round differently, which can move points whose similarities tie to within rounding.
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
    """Give each empty cluster one point: the worst-fitting points of clusters that keep a member.

    assign: (B, R) cluster ids; sim_to_own: (B, R) cosine similarity of each point to its centroid.
    Requires R >= c. Returns (B, R) ids with every cluster used; ``assign`` itself when none is empty.

    This is the greedy "repeatedly move the worst-fitting point whose cluster has more than one member into the
    lowest-numbered empty cluster" (ties: the lower point index), computed at once and with no host read: visit
    points from worst to best fit; a cluster's members become movable in that order, all but its best-fitting one;
    the e-th movable point visited fills the e-th empty cluster.
    """
    bsz, r = assign.shape
    counts = _cluster_sizes(assign, c)  # (B, c)
    visit = torch.sort(sim_to_own, dim=1, stable=True).indices  # (B, R) points, worst fit first
    cluster = assign.gather(1, visit)  # (B, R) the cluster of each visited point
    # each visited point's rank among its cluster's members in visit order: group the visit positions by cluster
    # (a stable sort keeps visit order inside a group), then subtract where the point's group starts
    grouped = torch.sort(cluster, dim=1, stable=True).indices
    group_start = (counts.cumsum(dim=1) - counts).gather(1, cluster.gather(1, grouped))
    slot = torch.arange(r, device=assign.device).expand(bsz, r) - group_start
    rank = torch.empty_like(cluster).scatter_(1, grouped, slot)
    movable = rank < counts.gather(1, cluster) - 1  # never empty a cluster
    nth = movable.cumsum(dim=1)  # 1-based count of movable points visited so far
    take = movable & (nth <= (counts == 0).sum(dim=1, keepdim=True))
    empty_first = torch.sort((counts > 0).to(torch.uint8), dim=1, stable=True).indices  # empty ids, ascending
    target = empty_first.gather(1, (nth - 1).clamp(0, c - 1))
    return assign.scatter(1, visit, torch.where(take, target, cluster))


def _no_host_reads(x: torch.Tensor) -> bool:
    """True while being traced by torch.compile or captured into a CUDA graph: reading a value back to the host
    would break the graph there (or fail the capture)."""
    if torch.compiler.is_compiling():
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


@autocast_off
def cosine_kmeans(x: torch.Tensor, c: int, iters: int = 10) -> torch.Tensor:
    """Cluster points by cosine similarity.

    Args:
        x: (B, R, D) points; R >= c.
        c: number of clusters (>= 1).
        iters: maximum Lloyd iterations; stops early once no assignment changes (eagerly; compiled and captured
            calls run them all and keep the first unchanged assignment, see the module docstring).

    Returns:
        (B, R) long cluster ids in [0, c), every id used at least once in every row.
    """
    bsz, r, _ = x.shape
    if c < 1 or r < c:
        raise ValueError(f"cosine_kmeans needs 1 <= clusters <= points, got {c} clusters for {r} points.")
    xn = F.normalize(x.float(), dim=-1)
    if c == 1:
        return torch.zeros(bsz, r, dtype=torch.long, device=x.device)
    traced = _no_host_reads(x)
    centroids = xn[:, _spread_index(r, c, x.device) if not traced else _spread(r, c, x.device)]
    # a last column of ones: one scatter gives each cluster's sum and its member count (on a GPU every kernel
    # launch counts, and an iteration needs both)
    counted = torch.cat([xn, torch.ones_like(xn[..., :1])], dim=-1)
    assign = None
    done = torch.zeros((), dtype=torch.bool, device=x.device) if traced else None  # eager's early stop, on the device
    for _ in range(iters):
        best, new_assign = (xn @ centroids.transpose(1, 2)).max(dim=-1)  # (B, R) similarity to and id of the nearest
        if traced:
            # no early stop: once no assignment changes the result is kept, where eager stops. Recomputing the
            # centroids from that assignment gives them back only up to rounding (CUDA's scatter_add adds in any
            # order), which could move a near-tie point in a later iteration
            new_assign = _fill_empty_clusters(new_assign, best, c)
            if assign is not None:
                done = done | (new_assign == assign).all()
                new_assign = torch.where(done, assign, new_assign)
            sums = _cluster_sums(counted, new_assign, c)
        else:
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


def _spread(r: int, c: int, device: torch.device) -> torch.Tensor:
    """The initial centroids' indices: ``c`` evenly spaced, distinct points of ``r``, i.e. ((2i + 1) r) // (2c),
    computed on the device (what traced calls use: a CUDA-graph capture cannot copy a tensor from the host, and
    dynamo does not trace through `functools.lru_cache`)."""
    return torch.div((2 * torch.arange(c, device=device) + 1) * r, 2 * c, rounding_mode="floor")


@functools.lru_cache(maxsize=256)
def _spread_index(r: int, c: int, device: torch.device) -> torch.Tensor:
    """`_spread` for eager calls, built once per shape from host integers (no kernel launches per call; a normal
    tensor even when first built under inference mode, since later calls may be tracked by autograd)."""
    with torch.inference_mode(False):
        return torch.tensor([((2 * i + 1) * r) // (2 * c) for i in range(c)], device=device)
