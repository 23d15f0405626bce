"""UNCURL, pure math: task-aware spectral clustering of a layer's experts by their router logits.

UNCURL (Sarkar, Lausen, Cevher, Zha, Brox, Karypis 2024, "Revisiting SMoE Language Models by
Evaluating Inefficiencies with Task Specific Expert Pruning", arXiv 2409.01483, ENLSP @ NeurIPS
2024) reduces the experts of every MoE layer offline, for one task: per layer, the experts are
clustered by spectral clustering of their router logits on the task's data; each cluster's members
are permutation-aligned and merged, weighted by how often the task routes to them. The paper reports
a *threshold pruning factor* (E / experts kept) above which task quality starts to drop.

Only the abstract and third-party summaries of the paper were reachable while this was written
(no code is public), so the details below are this implementation's choices, stated:
- affinity between experts i, j: cosine similarity of their router-logit columns over the task's
  tokens, mapped to [0, 1] as (1 + cos) / 2 (computed from the Gram matrix sum_t l_t l_t^T, so the
  statistics are [E, E], not [T, E]); zero diagonal;
- spectral clustering of Ng, Jordan and Weiss (2001): the k eigenvectors of the symmetric normalised
  Laplacian with the smallest eigenvalues, rows normalised, k-means (k-means++ seeding, fixed seed,
  the best of several restarts);
- each cluster's representative is its most routed member (it keeps its router row); members are
  aligned to it (weight matching) and averaged with routing-frequency weights (see :mod:`.merge`);
- adaptive per-layer counts (an option): the eigengap heuristic (von Luxburg 2007, "A tutorial on
  spectral clustering") estimates how many clusters each layer's routing supports, and a global
  budget of experts is shared out in proportion to those estimates.

Super Experts (Su et al. 2025, arXiv 2507.23279), when protected, are clusters of their own.
Legend: T task tokens, E experts of a layer, n experts clustered, k clusters.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .merge import MergeDecision, check_groups


def logit_affinity(gram: torch.Tensor) -> torch.Tensor:
    """[E, E] affinity (1 + cos) / 2 of router-logit columns from their Gram matrix ``gram [E, E]``
    (sum over tokens of l_t l_t^T); zero diagonal. An expert whose logits are all zero has cos 0."""
    g = gram.double()
    n = g.diagonal().clamp_min(0).sqrt()  # [E]
    cos = g / torch.outer(n, n).clamp_min(1e-30)
    a = (1.0 + cos.clamp(-1.0, 1.0)) / 2.0
    a.fill_diagonal_(0.0)
    return a


def _laplacian_eigen(a: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric normalised Laplacian of ``a``."""
    a = a.double().cpu().numpy()
    d = a.sum(1)
    inv = np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1e-300)), 0.0)
    lap = np.eye(len(a)) - inv[:, None] * a * inv[None, :]
    return np.linalg.eigh((lap + lap.T) / 2)


def _kmeans(x: np.ndarray, k: int, seed: int, restarts: int = 10, iters: int = 100) -> np.ndarray:
    """Labels [n] of k-means on rows of ``x`` (k-means++ seeding), best inertia of ``restarts``."""
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        centers = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = np.min(((x[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1.0 / len(x))
            centers.append(x[rng.choice(len(x), p=p)])
        c = np.asarray(centers)
        for _ in range(iters):
            labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
            new = np.stack([x[labels == j].mean(0) if np.any(labels == j) else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        inertia = float(((x - c[labels]) ** 2).sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels.copy(), inertia
    return best


def spectral_clusters(a: torch.Tensor, k: int, seed: int = 0) -> list[list[int]]:
    """Exactly ``k`` non-empty clusters (sorted index lists, ordered by first member) of the items of
    affinity ``a [n, n]`` by normalised spectral clustering."""
    n = a.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot form {k} clusters from {n} experts")
    if k == n:
        return [[i] for i in range(n)]
    if k == 1:
        return [list(range(n))]
    _, vec = _laplacian_eigen(a)
    emb = vec[:, :k]
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    labels = _kmeans(emb, k, seed)
    clusters = [sorted(np.flatnonzero(labels == j).tolist()) for j in range(k)]
    clusters = [c for c in clusters if c]
    while len(clusters) < k:  # k-means left a cluster empty (identical rows): split the largest
        big = max(range(len(clusters)), key=lambda i: (len(clusters[i]), -i))
        c = clusters.pop(big)
        clusters += [c[: len(c) // 2], c[len(c) // 2:]]
    return sorted(clusters, key=lambda c: c[0])


def eigengap_count(a: torch.Tensor, lo: int, hi: int) -> int:
    """The cluster count c in [lo, hi] after which the Laplacian's spectrum jumps most
    (largest lambda_{c+1} - lambda_c; ties: the smaller c)."""
    n = a.shape[0]
    lo, hi = max(1, lo), min(hi, n - 1)
    if lo > hi:
        return min(max(lo, 1), n)
    vals, _ = _laplacian_eigen(a)
    gaps = [(vals[c] - vals[c - 1], -c) for c in range(lo, hi + 1)]  # vals[c] is lambda_{c+1} (0-based)
    return -max(gaps)[1]


def allocate_counts(estimates: Sequence[int], budget: int, lo: Sequence[int], hi: int) -> list[int]:
    """Per-layer expert counts summing to ``budget``, proportional to ``estimates`` (largest remainder),
    each within [lo[i], hi]."""
    n = len(estimates)
    if not sum(lo) <= budget <= n * hi:
        raise ValueError(f"a budget of {budget} experts cannot give {n} layers between {list(lo)} and {hi} each")
    w = np.maximum(np.asarray(estimates, dtype=np.float64), 1e-9)
    counts = np.asarray(lo, dtype=np.int64).copy()
    rest = budget - int(counts.sum())
    while rest > 0:  # hand out one expert at a time to the layer furthest below its proportional share
        share = w / w.sum() * budget
        room = counts < hi
        i = int(np.argmax(np.where(room, share - counts, -np.inf)))
        counts[i] += 1
        rest -= 1
    return counts.tolist()


def uncurl_groups(freq: torch.Tensor, gram: torch.Tensor, targets: Sequence[int],
                  partitions: Sequence[Sequence[int]], protected: set[int] = frozenset(), seed: int = 0
                  ) -> MergeDecision:
    """UNCURL grouping of one layer. freq [E] routed-token counts, gram [E, E] Gram matrix of the router
    logits on the task's tokens; ``partitions``: routing groups, each keeping ``targets[g]`` experts.
    Each group's representative (first) is its most routed member; protected experts stay alone."""
    check_groups(targets, partitions, protected)
    aff = logit_affinity(gram)
    groups: list[tuple[int, ...]] = []
    for part, k in zip(partitions, targets):
        ses = [e for e in part if e in protected]
        rest = [e for e in part if e not in protected]
        groups += [(s,) for s in ses]
        if rest:
            idx = torch.tensor(rest)
            for c in spectral_clusters(aff[idx][:, idx], k - len(ses), seed):
                groups.append(tuple(sorted((rest[i] for i in c), key=lambda e: (-float(freq[e]), e))))
    return MergeDecision(tuple(groups))
