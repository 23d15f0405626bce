"""NAEE (Lu et al. 2024, "Not All Experts are Equal", ACL 2024): each MoE layer keeps the experts whose
removal changes its block's output least on calibration inputs (:mod:`secompress.prune.reconstruction`).

The final expert count is known up front; which experts stay is decided per layer in the pass, from
the hidden states entering the layer in the original model (the :data:`~.base.CALIB` stream, its
first ``naee_samples`` windows), Super Experts kept unless protection is off.
"""
from __future__ import annotations

from ...checkpoints import check_model
from ...pipeline import Stream
from ...streaming import run_layer
from ..reconstruction import capture_block_inputs, naee_layer
from ..result import make_result
from ..select import change_of, protected_by_layer
from ..structural import keep_layer_experts, remove_experts, set_expert_count
from .base import CALIB, MethodPlan, PruneMethod, expert_plan, start_plan


class NaeeLayers:
    def __init__(self, src, mplan: MethodPlan):
        self.src, self.mplan = src, mplan
        self.pplan = mplan.detail
        self.ses = protected_by_layer(mplan.super_experts) if mplan.config.protect_super_experts else {}
        self.kept, self.choices, self.changes = {}, {}, []
        chunks = list(mplan.calib.split(mplan.config.batch_size))
        self.streams = {CALIB: Stream(chunks, before=True, keep_inputs=True)}

    def on_layer(self, index: int, layer, inputs) -> None:
        if index not in self.mplan.moe_layers:
            return
        ad, model = self.src.adapter, self.src.model
        with capture_block_inputs(model, ad, [index]) as got:  # the block's inputs in the original layer
            for h, (args, kwargs) in zip(inputs.entered[CALIB], inputs.entered_args[CALIB]):
                run_layer(layer, h, args, kwargs)
        prot = self.ses.get(index, set())
        choice = naee_layer(model, ad, self.pplan, index, got[index], prot, self.mplan.config.naee_limit)
        keep = [e for e in range(self.mplan.num_experts) if e not in set(choice.removed)]
        keep_layer_experts(ad.block_of(layer), ad, keep, ad.block_path(index))
        self.kept[index], self.choices[index] = keep, choice
        if (ch := change_of(index, choice.unprotected, choice.removed, prot)) is not None:
            self.changes.append(ch)

    def on_end(self, model) -> None:
        set_expert_count(model, self.src.adapter, self.pplan.num_keep)


class Naee(PruneMethod):
    name = "naee"
    needs_calibration = True

    def target(self, skeleton, config):
        return expert_plan(skeleton, config.ratio)

    def plan(self, skeleton, config, profile, calib=None) -> MethodPlan:
        pplan = self.target(skeleton, config)
        if calib is None or calib.ndim != 2 or calib.shape[0] < 1:
            raise ValueError("NAEE decides from calibration windows [N, S]; none were given")
        mplan = start_plan(skeleton, config, profile, calib=calib[: config.naee_samples], detail=pplan)
        if config.protect_super_experts:  # refuse before any compute
            for layer, ses in protected_by_layer(mplan.super_experts).items():
                pplan.check_protection(layer, ses)
        remove_experts(skeleton, check_model(skeleton), {l: list(range(pplan.num_remove)) for l in mplan.moe_layers})  # shapes
        return mplan

    def step(self, src, mplan: MethodPlan, progress: bool = True) -> NaeeLayers:
        return NaeeLayers(src, mplan)

    def result(self, mplan, step: NaeeLayers, profile, data_source, ppl=(None, None), seconds=0.0, **kw):
        routed = protected_by_layer(mplan.super_experts)
        touched = [(l, e) for l, c in step.choices.items() for e in c.removed if e in routed.get(l, ())]
        extra = {"naee": {str(l): {"loss": c.loss, "exhaustive": c.exhaustive} for l, c in step.choices.items()}}
        return make_result(mplan, step.kept, profile, data_source, touched=touched, changes=step.changes,
                           extra=extra, ppl=ppl, seconds=seconds, **kw)
