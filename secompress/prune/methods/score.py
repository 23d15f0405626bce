"""Removal by a registered expert score (REAP, frequency, EAN/EASY-EP, random): decided up front.

The score of every (layer, expert) comes from the profile's statistics
(:mod:`secompress.prune.scores`, the registry ``SCORERS``); each MoE layer removes its
lowest-scoring experts, never a Super Expert unless protection is off
(:func:`~secompress.prune.select.select_by_score`). Everything is known before any weight is
read; the per-layer step only slices the layer's experts and router rows.
"""
from __future__ import annotations

import numpy as np

from ...checkpoints import check_model
from ..result import make_result
from ..scores import score
from ..select import protected_by_layer, select_by_score
from ..structural import keep_layer_experts, remove_experts, set_expert_count
from .base import MethodPlan, PruneMethod, expert_plan, start_plan


class KeepExperts:
    """The per-layer step: each MoE layer keeps the planned experts (original ids, new id = position)."""

    def __init__(self, src, kept: dict[int, list[int]]):
        self.src, self.kept = src, kept

    def on_layer(self, index: int, layer, inputs) -> None:
        if index in self.kept:
            ad = self.src.adapter
            keep_layer_experts(ad.block_of(layer), ad, self.kept[index], ad.block_path(index))

    def on_end(self, model) -> None:
        set_expert_count(model, self.src.adapter, len(next(iter(self.kept.values()))))


class ScoreRemoval(PruneMethod):
    def __init__(self, name: str):
        self.name = name  # a SCORERS name

    def target(self, skeleton, config):
        return expert_plan(skeleton, config.ratio)

    def plan(self, skeleton, config, profile, calib=None) -> MethodPlan:
        pplan = self.target(skeleton, config)
        mplan = start_plan(skeleton, config, profile)
        E = mplan.num_experts
        stats = {k: v[:, :E] for k, v in profile.arrays.items() if np.ndim(v) == 2}  # [L, E]
        selection = select_by_score(score(self.name, stats, config.seed), pplan, mplan.moe_layers,
                                    mplan.super_experts, config.protect_super_experts)
        mplan.kept = remove_experts(skeleton, check_model(skeleton), selection.removed).kept  # meta: shapes only
        mplan.detail = selection
        return mplan

    def step(self, src, mplan: MethodPlan, progress: bool = True) -> KeepExperts:
        return KeepExperts(src, mplan.kept)

    def result(self, mplan, step, profile, data_source, ppl=(None, None), seconds=0.0, **kw):
        routed = protected_by_layer(mplan.super_experts)
        removed = mplan.detail.removed
        touched = [(l, e) for l, v in removed.items() for e in v if e in routed.get(l, ())]
        return make_result(mplan, mplan.kept, profile, data_source, touched=touched,
                           changes=mplan.detail.protection_changes, ppl=ppl, seconds=seconds, **kw)
