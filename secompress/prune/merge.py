"""Expert merging, pure math: which experts merge (grouping), neuron alignment, averaging.

No hooks, modules or files: inputs are per-layer statistics (tensors) and per-expert
weights as nn.Linear-shaped tensors (``secompress.experts.expert_weights``); outputs are
groups and merged weights. Two grouping criteria, one per paper:

- **M-SMoE**, the merge stage of MC-SMoE (Li et al., ICLR 2024, "Merge, Then Compress:
  Demystify Efficient SMoE with Hints from Its Routing Policy"): the *dominant* experts are
  the most frequently routed ones; every other expert joins the dominant expert whose
  router logits over the calibration tokens are most similar (cosine of the experts'
  logit columns); within a group the members' intermediate neurons are permuted to match
  the dominant expert's (weight matching, a linear assignment on the concatenated
  gate/up/down weights), then the group is averaged with routing-frequency weights.
  MC-SMoE chooses the number of dominant experts per layer from a global frequency
  ranking; a transformers config holds one expert count, so here every layer keeps the
  same number.
- **HC-SMoE** (Chen et al. 2024/ICML 2025, "Retraining-Free Merging of Sparse MoE via
  Hierarchical Clustering"): each expert is represented by its output averaged over all
  calibration tokens (every expert run on every token, so the grouping does not depend
  on the router); agglomerative clustering with average linkage on Euclidean distance
  until the target count is left; each cluster is averaged with routing-frequency
  weights (the paper's default merge, no permutation).

Router (both): each group keeps one expert slot, its *representative* (M-SMoE: the
dominant expert; HC-SMoE: the most frequently routed member), and the router keeps that
expert's row; the other members' rows go. MC-SMoE keeps the full router and points every
member's slot at the merged weights; stock transformers cannot express shared weights
between expert slots without storing them twice, so the members' slots are removed. The
representative's row is the one the frequency-weighted average leans on most, and M-SMoE
groups experts whose router logits already move together, so the representative's logit
stands in for its members'.

Super Experts (Su et al. 2025, arXiv 2507.23279), when protected, are groups of their own:
nothing joins them and they are never averaged, so they stay bit-identical.
Legend: T calibration tokens, E experts of a layer, K experts kept, I expert FFN size, H hidden.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

Weights = dict[str, torch.Tensor]  # gate_proj/up_proj [I, H], down_proj [H, I], optional *_bias


@dataclass(frozen=True)
class MergeDecision:
    """One layer's merge: ``groups[i]`` lists original expert ids, the representative first."""

    groups: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        ids = [e for g in self.groups for e in g]
        if len(ids) != len(set(ids)) or any(not g for g in self.groups):
            raise ValueError(f"merge groups must be non-empty and disjoint, got {self.groups}")

    @property
    def representatives(self) -> list[int]:
        return sorted(g[0] for g in self.groups)

    def to_json(self) -> list[list[int]]:
        return [list(g) for g in self.groups]


def check_groups(targets: Sequence[int], partitions: Sequence[Sequence[int]], protected: set[int],
                 where: str = "") -> None:
    """An error unless each routing group can keep every protected expert alone and still hold
    a slot for its other experts to merge into."""
    for part, k in zip(partitions, targets):
        ses = set(protected) & set(part)
        others = len(part) - len(ses)
        if k < len(ses) + (1 if others else 0) or k > len(part):
            raise ValueError(f"{where}experts {list(part)} hold {len(ses)} protected Super Experts {sorted(ses)} and "
                             f"{others} others: keeping {k} cannot leave every Super Expert alone; keep more "
                             "experts or switch protection off")


def msmoe_groups(freq: torch.Tensor, logits: torch.Tensor, targets: Sequence[int],
                 partitions: Sequence[Sequence[int]], protected: set[int] = frozenset()) -> MergeDecision:
    """M-SMoE grouping. freq [E] routed-token counts, logits [T, E] router logits on the calibration
    tokens; ``partitions`` are the routing groups (one list of all experts without grouped routing),
    each keeping ``targets[g]`` experts. Protected experts are dominant and stay alone."""
    check_groups(targets, partitions, protected)
    z = torch.nn.functional.normalize(logits.double().T, dim=1)  # [E, T]
    sim = z @ z.T  # [E, E] cosine similarity of router-logit columns
    groups = []
    for part, k in zip(partitions, targets):
        ses = [e for e in part if e in protected]
        rest = sorted((e for e in part if e not in protected), key=lambda e: (-float(freq[e]), e))
        dominant = rest[: k - len(ses)]
        members = {d: [d] for d in dominant}
        for e in rest[k - len(ses):]:
            best = max(dominant, key=lambda d: (float(sim[e, d]), -d))
            members[best].append(e)
        groups += [(s,) for s in ses] + [tuple(members[d]) for d in dominant]
    return MergeDecision(tuple(groups))


def average_linkage(features: torch.Tensor, k: int) -> list[list[int]]:
    """Agglomerative clustering of rows ``features [n, D]`` (Euclidean, average linkage, scipy's
    UPGMA) cut into exactly k clusters (lists of row indices, each sorted)."""
    from scipy.cluster.hierarchy import cut_tree, linkage

    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot form {k} clusters from {n} items")
    if k == n:
        return [[i] for i in range(n)]
    if k == 1:
        return [list(range(n))]
    labels = cut_tree(linkage(features.double().cpu().numpy(), method="average"), n_clusters=k)[:, 0]  # [n]
    return [sorted(np.flatnonzero(labels == c).tolist()) for c in range(k)]


def hcsmoe_groups(freq: torch.Tensor, mean_out: torch.Tensor, targets: Sequence[int],
                  partitions: Sequence[Sequence[int]], protected: set[int] = frozenset()) -> MergeDecision:
    """HC-SMoE grouping. freq [E] routed-token counts, mean_out [E, H] each expert's output averaged
    over all calibration tokens; protected experts are clusters of their own."""
    check_groups(targets, partitions, protected)
    groups = []
    for part, k in zip(partitions, targets):
        ses = [e for e in part if e in protected]
        rest = [e for e in part if e not in protected]
        groups += [(s,) for s in ses]
        if rest:
            for c in average_linkage(mean_out[rest], k - len(ses)):
                ids = sorted((rest[i] for i in c), key=lambda e: (-float(freq[e]), e))  # representative first
                groups.append(tuple(ids))
    return MergeDecision(tuple(groups))


def _neuron_features(w: Weights) -> torch.Tensor:
    """[I, 2H (+3)]: each intermediate neuron's gate row, up row and down column (and biases)."""
    parts = [w["gate_proj"], w["up_proj"], w["down_proj"].T]
    if "gate_proj_bias" in w:
        parts += [w["gate_proj_bias"][:, None], w["up_proj_bias"][:, None]]
    return torch.cat([p.double() for p in parts], dim=1)


def align_permutation(ref: Weights, other: Weights) -> torch.Tensor:
    """Weight matching (MC-SMoE's neuron alignment, after Ainsworth et al. 2023 "Git Re-Basin"):
    the permutation ``p`` [I] of ``other``'s intermediate neurons maximising sum_j <ref_j, other_p[j]>
    over the concatenated gate/up rows and down columns (a linear assignment problem)."""
    from scipy.optimize import linear_sum_assignment

    cost = _neuron_features(ref) @ _neuron_features(other).T  # [I, I]
    _, cols = linear_sum_assignment(cost.cpu().numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def permute_neurons(w: Weights, perm: torch.Tensor) -> Weights:
    """The same expert with its intermediate neurons reordered (its function is unchanged)."""
    out = {k: v[perm] for k, v in w.items() if k in ("gate_proj", "up_proj", "gate_proj_bias", "up_proj_bias")}
    out["down_proj"] = w["down_proj"][:, perm]
    if "down_proj_bias" in w:
        out["down_proj_bias"] = w["down_proj_bias"]
    return out


def merge_weights(members: Sequence[Weights], freq: Sequence[float], align: bool) -> Weights:
    """Frequency-weighted average of a group (the first member is the reference); with ``align``
    every other member is first permuted onto the reference (M-SMoE). Experts never routed on
    the calibration data weigh as if routed once, so a group of them still averages."""
    f = np.maximum(np.asarray(freq, dtype=np.float64), 1.0)
    f = f / f.sum()
    ref = members[0]
    aligned = [ref] + [permute_neurons(m, align_permutation(ref, m)) if align else m for m in members[1:]]
    return {k: sum(float(fi) * m[k].double() for fi, m in zip(f, aligned)).to(ref[k].dtype) for k in ref}
