"""STUN, pure math: behaviour-similarity expert clustering, then Wanda-style unstructured pruning.

STUN (Lee, Hwang, Qiao, Campos, Yao, He 2025, "STUN: Structured-Then-Unstructured Pruning for
Scalable MoE Pruning", ACL 2025, arXiv 2409.06211; reference code github.com/thnkinbtfly/STUN):

1. **Structured: O(1) expert pruning by behaviour similarity.** Two experts behave alike when the
   router treats them alike. ``similarity="router"`` (the reference code's default,
   ``select_expert_pairs`` without ``load_path``): the L2 distance of the experts' router rows over
   the router's Frobenius norm; experts with close rows get close logits on every token, so the
   one kept takes the other's tokens. No forward pass at all. ``similarity="coact"`` (its Snowflake
   Arctic recipe, ``--load_path ... --divide_mean``): one calibration pass counts how often each pair
   is in the same token's top-k (``coact [E, E]``) and the distance is ``-coact / |mean(coact)|``,
   optionally mixed with the router distance (its ``mix_weight``). Raw counts grow with how often an
   expert is routed at all, so on a model with unbalanced routing they cluster the busiest experts
   together (on the bundled reference model that drops four of the most used experts of every
   layer: perplexity x6 at 25%); Arctic's balanced routing hides this, hence "router" by default.
   Greedy agglomeration joins the clusters of the closest pair until E - n_remove clusters are left
   (its ``greedy_but_reject_mixed`` with no threshold, stopping at the per-layer count). In each
   cluster only the member closest to the cluster's weight centroid is kept, with its own weights
   and router row (its ``dsatur_select_mean_weight_merge``): structured pruning, no averaging. A
   forward-pass count independent of E: the O(1) of the title.
2. **Unstructured: Wanda** (Sun, Liu, Bair, Kolter 2024, "A Simple and Effective Pruning Approach
   for Large Language Models", arXiv 2306.11695) inside the kept experts: weight W_ij scores
   |W_ij| * ||X_j||_2 with X the inputs the weight's expert receives; per output row the lowest
   scores are zeroed (unstructured), or in every 4 consecutive inputs of a row the 2 lowest (2:4).

Super Experts (Su et al. 2025, arXiv 2507.23279), when protected, are clusters of their own in
stage 1 and are left out of stage 2, so they stay bit-identical.
Legend: E experts, H hidden size, O out features, In in features.
"""
from __future__ import annotations

from typing import Sequence

import torch

PATTERNS = ("unstructured", "2:4")
SIMILARITIES = ("router", "coact")


def behaviour_distance(similarity: str, router: torch.Tensor | None = None, coact: torch.Tensor | None = None,
                       mix: float = 0.0) -> torch.Tensor:
    """[E, E] distance between experts. ``router``: L2 distance of router rows ``router [E, H]`` over
    the router's Frobenius norm; ``coact``: -coact / |mean(coact)| (+ ``mix`` x that router distance)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got '{similarity}'")
    rd = None
    if router is not None:
        r = router.detach().double().cpu()
        rd = torch.cdist(r, r) / r.norm().clamp_min(1e-30)
    if similarity == "router":
        if rd is None:
            raise ValueError("router similarity needs the router weight")
        return rd
    if coact is None:
        raise ValueError("coact similarity needs the co-selection counts")
    c = coact.double()
    scale = c.mean().abs()
    d = -c / scale if scale > 0 else torch.zeros_like(c)
    return d * mix + rd if mix and rd is not None else d


def greedy_clusters(dist: torch.Tensor, n_remove: int, partitions: Sequence[Sequence[int]],
                    protected: set[int] = frozenset()) -> list[tuple[int, ...]]:
    """STUN's greedy agglomeration inside each routing group: repeatedly join the clusters of the
    closest pair of experts (ties: lowest index pair) until each group has lost ``n_remove //
    len(partitions)`` clusters. Protected experts join nothing. Returns the clusters (sorted ids)."""
    per = n_remove // len(partitions)
    out = []
    for part in partitions:
        part = list(part)
        free = [e for e in part if e not in protected]
        if per > max(0, len(free) - 1):
            raise ValueError(f"experts {part} hold {len(part) - len(free)} protected Super Experts: removing {per} "
                             "cannot leave every Super Expert alone; keep more experts or switch protection off")
        cluster = {e: frozenset([e]) for e in part}
        d = dist.double().clone()
        d.fill_diagonal_(float("inf"))
        mask = torch.full_like(d, float("inf"))
        idx = torch.tensor(free, dtype=torch.long)
        mask[idx[:, None], idx[None, :]] = 0.0
        d = d + mask  # only pairs of free experts of this group
        d.fill_diagonal_(float("inf"))
        merges = 0
        while merges < per:
            flat = int(torch.argmin(d))
            a, b = divmod(flat, d.shape[1])
            union = cluster[a] | cluster[b]
            for x in union:
                cluster[x] = union
            for x in union:  # no pair inside one cluster is taken again
                for y in union:
                    d[x, y] = float("inf")
            merges += 1
        out += sorted({tuple(sorted(c)) for c in cluster.values()})
    return out


def closest_to_centroid(flat: torch.Tensor) -> int:
    """Row of ``flat [m, P]`` (members' flattened weights) nearest to their mean (ties: lower row)."""
    x = flat.double()
    return int(torch.argmin((x - x.mean(0)).norm(dim=1)))


def wanda_mask(weight: torch.Tensor, in_sq: torch.Tensor, sparsity: float, pattern: str = "unstructured"
               ) -> torch.Tensor:
    """Boolean keep-mask [O, In] of ``weight [O, In]`` by Wanda scores |W| * sqrt(in_sq) (``in_sq [In]``:
    the sum of squared inputs per input feature). unstructured: each row keeps its In - floor(sparsity
    * In) best; 2:4: each group of 4 consecutive inputs keeps its 2 best (``sparsity`` must be 0.5).
    Ties keep the lower index."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got '{pattern}'")
    O, In = weight.shape
    score = weight.detach().double().abs() * in_sq.double().clamp_min(0).sqrt()[None, :]  # [O, In]
    keep = torch.zeros(O, In, dtype=torch.bool)
    if pattern == "2:4":
        if abs(sparsity - 0.5) > 1e-9 or In % 4:
            raise ValueError(f"2:4 sparsity removes exactly half of every 4 inputs: needs sparsity 0.5 and in "
                             f"features divisible by 4, got {sparsity} and {In}")
        s = score.reshape(O, In // 4, 4)
        order = torch.argsort(-s, dim=-1, stable=True)[..., :2]  # [O, In/4, 2]
        keep.view(O, In // 4, 4).scatter_(-1, order, True)
        return keep
    n_drop = int(sparsity * In)
    order = torch.argsort(-score, dim=1, stable=True)[:, : In - n_drop]  # [O, In - n_drop]
    keep.scatter_(1, order, True)
    return keep
