"""Expert merging: M-SMoE (merge stage of MC-SMoE, Li et al., ICLR 2024) and HC-SMoE (Chen et al.,
ICML 2025), per MoE layer in the pass (:mod:`secompress.prune.merging`, math in :mod:`~secompress.prune.merge`).

The final expert count is known up front (the skeleton gets it); the groups are decided per layer
from the calibration windows' hidden states entering the layer in the original model
(:data:`~.base.CALIB`): M-SMoE groups by router-logit similarity around the most routed
(dominant) experts and aligns neurons before averaging; HC-SMoE clusters the experts' mean outputs
over all calibration tokens. With protection a Super Expert is a group of its own (bit-identical).
"""
from __future__ import annotations

from ...checkpoints import check_model
from ...pipeline import Stream
from ..layer_stats import LayerStats, observe_entered
from ..merge import check_groups, hcsmoe_groups, msmoe_groups
from ..merging import apply_merge, decide_merge, finish_merge, merge_targets, merged_super_experts
from ..result import make_result
from ..select import protected_by_layer
from ..structural import keep_layer_experts
from .base import CALIB, MethodPlan, PruneMethod, expert_plan, start_plan


class MergeLayers:
    def __init__(self, src, mplan: MethodPlan, method: "ExpertMerge"):
        self.src, self.mplan, self.method = src, mplan, method
        self.protected = protected_by_layer(mplan.super_experts) if mplan.config.protect_super_experts else {}
        self.decisions: dict = {}
        self.streams = {CALIB: Stream(list(mplan.calib.split(mplan.config.batch_size)), before=True,
                                      keep_inputs=True)}

    def on_layer(self, index: int, layer, inputs) -> None:
        if index not in self.mplan.moe_layers:
            return
        ad, m = self.src.adapter, self.method
        stats = observe_entered(self.src.model, ad, index, layer, inputs.entered[CALIB], inputs.entered_args[CALIB],
                                LayerStats(self.mplan.num_experts, frozenset({m.statistic})))
        d = decide_merge(m.groups_fn, m.features(stats), stats.freq, self.mplan.detail, self.protected.get(index, ()))
        apply_merge(ad.block_of(layer), ad, d, stats.freq, m.align, ad.block_path(index))
        self.decisions[index] = d

    def on_end(self, model) -> None:
        finish_merge(model, self.src.adapter, self.mplan.detail.num_keep)


class ExpertMerge(PruneMethod):
    needs_calibration = True
    changes_weights = True

    def __init__(self, name: str, statistic: str, features, align: bool, groups_fn):
        self.name, self.statistic, self.align, self.groups_fn = name, statistic, align, groups_fn
        self.features = features  # LayerStats -> the tensor groups_fn compares

    def target(self, skeleton, config):
        return expert_plan(skeleton, config.ratio)

    def plan(self, skeleton, config, profile, calib=None) -> MethodPlan:
        pplan = self.target(skeleton, config)
        if calib is None or calib.ndim != 2 or calib.shape[0] < 1:
            raise ValueError(f"'{self.name}' decides from calibration windows [N, S]; none were given")
        mplan = start_plan(skeleton, config, profile, calib=calib, detail=pplan)
        if config.protect_super_experts:  # refuse before any compute
            routed = protected_by_layer(mplan.super_experts)
            for layer in mplan.moe_layers:
                check_groups(merge_targets(pplan), pplan.groups(), routed.get(layer, set()), f"layer {layer}: ")
        ad = check_model(skeleton)
        for l in mplan.moe_layers:  # on meta: the final shapes; which experts stay is decided in the pass
            keep_layer_experts(ad.block_of(ad.layers(skeleton)[l]), ad, list(range(pplan.num_keep)), ad.block_path(l))
        finish_merge(skeleton, ad, pplan.num_keep)
        return mplan

    def step(self, src, mplan: MethodPlan, progress: bool = True) -> MergeLayers:
        return MergeLayers(src, mplan, self)

    def result(self, mplan, step: MergeLayers, profile, data_source, ppl=(None, None), seconds=0.0, **kw):
        ds = step.decisions
        groups = {str(l): d.to_json() for l, d in sorted(ds.items())}
        extra = {"merge": {"method": self.name, "groups": groups,
                           "router": "each group keeps its representative's router row (first id of the group)"}}
        notes = ["merge groups (representative first): " + "; ".join(f"layer {l}: {g}" for l, g in groups.items())]
        return make_result(mplan, {l: d.representatives for l, d in ds.items()}, profile, data_source,
                           touched=merged_super_experts(ds, mplan.super_experts), extra=extra, ppl=ppl,
                           seconds=seconds, notes=notes, touched_what="MERGED", **kw)


MSMOE = ExpertMerge("m-smoe", "logits", LayerStats.router_logits, True, msmoe_groups)  # [T, E]
HCSMOE = ExpertMerge("hc-smoe", "outputs", LayerStats.mean_outputs, False, hcsmoe_groups)  # [E, H]
