"""Which experts to remove: a validated plan and a score-based, SE-protected choice.

Pure logic over integers and numpy arrays (no torch modules, hooks or files).

A transformers config holds one routed-expert count, so every MoE layer loses the
same number of experts. With grouped routing (DeepSeek ``n_group``/``topk_group``)
the router splits the experts into ``n_group`` contiguous groups; the choice here
removes the same number from every original group, so each kept expert stays in its
group after removal and the pruned router sees the same group structure.

Super Experts (SEs; Su et al. 2025, arXiv 2507.23279) are never removed unless
protection is switched off explicitly. When protection overrides the score, the
choice is recorded as a :class:`ProtectionChange`.
Legend: L decoder layers, E routed experts, G groups.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class PrunePlan:
    """How many experts each MoE layer keeps, checked against the router's needs."""

    ratio: float
    num_experts: int  # E before pruning
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    min_experts_per_group: int = 1

    def __post_init__(self):
        E, k = self.num_experts, self.top_k
        if not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0):
            raise ValueError(f"ratio must be in (0, 1) (the share of routed experts to remove), got {self.ratio}")
        if self.n_group < 1 or E % self.n_group:
            raise ValueError(f"{E} experts cannot form n_group={self.n_group} groups")
        if self.num_remove == 0:
            raise ValueError(f"ratio {self.ratio} of {E} experts removes none; use a ratio >= {0.5 / E:.3g}")
        if self.num_keep < k:
            raise ValueError(f"ratio {self.ratio} keeps {self.num_keep} of {E} experts per layer, fewer than "
                             f"top_k={k} experts routed per token; use a ratio <= {(E - k) / E:.3g}")
        if self.n_group > 1:
            if self.num_keep % self.n_group:
                raise ValueError(f"ratio {self.ratio} keeps {self.num_keep} experts, not divisible by n_group="
                                 f"{self.n_group} (grouped routing needs equal groups); keep a multiple of "
                                 f"{self.n_group}")
            g = self.num_keep // self.n_group
            if g < self.min_experts_per_group:
                raise ValueError(f"ratio {self.ratio} leaves {g} experts per group; this router needs at "
                                 f"least {self.min_experts_per_group} per group")
            if self.topk_group * g < k:
                raise ValueError(f"ratio {self.ratio} leaves {g} experts in each of the topk_group="
                                 f"{self.topk_group} groups a token may use: {self.topk_group * g} < top_k={k}")

    @property
    def num_remove(self) -> int:
        return int(math.floor(self.ratio * self.num_experts + 0.5))  # round half up

    @property
    def num_keep(self) -> int:
        return self.num_experts - self.num_remove

    @property
    def group_size(self) -> int:
        return self.num_experts // self.n_group

    @property
    def remove_per_group(self) -> int:
        return self.num_remove // self.n_group

    def groups(self) -> list[list[int]]:
        """The original expert ids of each routing group ([G] lists; one group without grouped routing)."""
        s = self.group_size
        return [list(range(g * s, (g + 1) * s)) for g in range(self.n_group)]

    def check_protection(self, layer: int, protected: Iterable[int]) -> None:
        """An error when a layer (or group) has more SEs than it keeps experts."""
        prot = set(protected)
        for g, members in enumerate(self.groups()):
            ses = sorted(prot & set(members))
            keep = self.group_size - self.remove_per_group
            if len(ses) > keep:
                where = f"group {g} of layer {layer}" if self.n_group > 1 else f"layer {layer}"
                raise ValueError(f"{where} has {len(ses)} Super Experts {ses} but ratio {self.ratio} keeps only "
                                 f"{keep} experts there; use a smaller ratio or protect_super_experts=False")


def make_plan(ratio: float, num_experts: int, top_k: int, group_values: tuple | None = None,
              min_experts_per_group: int = 1) -> PrunePlan:
    """A :class:`PrunePlan`; ``group_values`` is (n_group, topk_group) from the config, or None."""
    n_group, topk_group = (group_values or (None, None))
    n_group = int(n_group or 1)
    topk_group = int(topk_group or n_group)
    return PrunePlan(ratio, num_experts, top_k, n_group, topk_group, min_experts_per_group)


@dataclass(frozen=True)
class ProtectionChange:
    """In ``layer``, the score would have removed ``spared`` (SEs); ``removed_instead`` went instead."""

    layer: int
    spared: tuple[int, ...]
    removed_instead: tuple[int, ...]

    def to_json(self) -> dict:
        return {"layer": self.layer, "super_experts_spared": list(self.spared),
                "removed_instead": list(self.removed_instead)}


@dataclass
class Selection:
    removed: dict[int, list[int]]  # MoE layer -> sorted expert ids to remove
    protection_changes: list[ProtectionChange] = field(default_factory=list)

    def kept(self, layer: int, num_experts: int) -> list[int]:
        gone = set(self.removed[layer])
        return [e for e in range(num_experts) if e not in gone]


def change_of(layer: int, unprotected: Iterable[int], protected_choice: Iterable[int],
              ses: Iterable[int]) -> ProtectionChange | None:
    """The record of what protection changed in one layer, or None if nothing."""
    unp, got, ses = set(unprotected), set(protected_choice), set(ses)
    spared = sorted(unp & ses)
    if not spared:
        return None
    return ProtectionChange(layer, tuple(spared), tuple(sorted(got - unp)))


def protected_by_layer(protected: Iterable[tuple[int, int | str]]) -> dict[int, set[int]]:
    """{layer: routed SE ids}; shared-expert SEs are dropped (pruning never touches shared experts)."""
    out: dict[int, set[int]] = defaultdict(set)
    for layer, e in protected:
        if e != "shared":
            out[int(layer)].add(int(e))
    return out


def select_by_score(scores: np.ndarray, plan: PrunePlan, moe_layers: Sequence[int],
                    protected: Iterable[tuple[int, int | str]] = (), protect: bool = True) -> Selection:
    """Remove the ``plan.num_remove`` lowest-scoring experts of every MoE layer.

    scores: [L, E] importance (higher = keep). Ties go to the lower expert id (it is
    removed first). With grouped routing each group loses ``plan.remove_per_group``.
    Protected SEs are skipped in favour of the next-lowest expert; with
    ``protect=False`` they are ranked like any other expert.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != plan.num_experts:
        raise ValueError(f"scores must be [layers, {plan.num_experts}], got {scores.shape}")
    prot = protected_by_layer(protected)
    removed, changes = {}, []
    for layer in moe_layers:
        row = scores[layer]  # [E]
        if not np.isfinite(row).all():
            raise ValueError(f"layer {layer}: non-finite expert scores {row.tolist()}")
        ses = prot.get(layer, set()) if protect else set()
        if protect:
            plan.check_protection(layer, ses)
        naive, chosen = [], []
        for members in plan.groups():
            order = sorted(members, key=lambda e: (row[e], e))  # ascending importance
            q = plan.remove_per_group
            naive += order[:q]
            chosen += [e for e in order if e not in ses][:q]
        removed[layer] = sorted(chosen)
        ch = change_of(layer, naive, chosen, ses)
        if ch is not None:
            changes.append(ch)
    return Selection(removed, changes)


def num_subsets(plan: PrunePlan) -> int:
    """How many removal sets a plan allows in one layer (product over groups)."""
    return math.comb(plan.group_size, plan.remove_per_group) ** plan.n_group
