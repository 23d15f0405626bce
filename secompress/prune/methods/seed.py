"""What the seed methods (PreMoe, UNCURL, DERN, STUN) share: one per-layer step, one plan.

Each method removes ``ratio`` of every MoE layer's routed experts (the final count is known up front
and given to the skeleton); which experts stay, and what is written into them, is decided per layer
in the pass from statistics of the calibration windows *entering the layer in the original model*
(the ``before`` stream :data:`~.base.CALIB` with ``keep_inputs``), collected by
:class:`~secompress.prune.seed_stats.SeedStats`. A method that needs the inputs of the layer as
changed (STUN's Wanda stage) also reads :data:`CALIB_P`, the same windows propagated through the
layers already pruned. A subclass says which statistics it wants (``statistics``), whether it reads
the propagated stream (``propagated``) and how one layer is decided and changed (``layer``).

Refused before any compute: a task method's data below ``task_min_tokens`` (:meth:`SeedMethod.check_data`,
called before the profile), a ratio below top_k, Super Experts that cannot be spared at this ratio;
before the pass, for a model in memory: experts of unequal width where weights are combined.
"""
from __future__ import annotations

from ...checkpoints import check_model
from ...pipeline import Stream
from ..layer_stats import observe_entered
from ..result import make_result
from ..seed_stats import SeedStats
from ..select import protected_by_layer
from ..structural import remove_experts, set_expert_count
from .base import CALIB, MethodPlan, PruneMethod, expert_plan, start_plan

CALIB_P = "calibration-propagated"  # the calibration windows through the layers already pruned


def expert_widths(experts) -> list[int]:
    """Each routed expert's intermediate width (fused modules: one for all; per-expert: each its own)."""
    per = getattr(experts, "per_expert", None)
    if per is not None:
        return [int(m.gate_proj.weight.shape[0]) for m in per]
    w = experts.gate_up_proj  # [E, 2I, H] or transposed [E, H, 2I]
    I2 = w.shape[2] if getattr(experts, "is_transposed", False) else w.shape[1]
    return [int(I2) // 2] * int(w.shape[0])


def check_widths(model, name: str) -> None:
    """A ValueError unless every MoE layer's routed experts have the config's width (weights combined
    across experts need one width)."""
    ad = check_model(model)
    I = ad.intermediate_size(model.config)
    for l in ad.moe_layer_indices(model):
        widths = sorted(set(expert_widths(ad.experts_of(ad.block_of(ad.layers(model)[l])))))
        if widths != [I]:
            raise ValueError(f"'{name}' combines experts' weights, which needs experts of one width: layer {l}'s "
                             f"routed experts are {widths} neurons wide (config {I})")


class SeedLayers:
    """The per-layer step of a seed method (resident or streamed source alike)."""

    def __init__(self, src, mplan: MethodPlan, method: "SeedMethod"):
        self.src, self.mplan, self.method = src, mplan, method
        cfg = mplan.config
        self.protect = cfg.protect_super_experts
        self.protected = protected_by_layer(mplan.super_experts)  # {layer: routed SEs}
        self.pplan = mplan.detail
        self.decisions, self.kept, self.touched, self.extra = {}, {}, [], {}
        chunks = list(mplan.calib.split(cfg.batch_size)) if mplan.calib is not None else []
        self.streams = {}
        if method.statistics(cfg):
            self.streams[CALIB] = Stream(chunks, before=True, keep_inputs=True)
        if method.propagated(cfg):
            self.streams[CALIB_P] = Stream(chunks)

    def new_stats(self, num_experts: int, want) -> SeedStats:
        cfg, ad = self.mplan.config, self.src.adapter
        return SeedStats(num_experts, frozenset(want), cfg.tcess_top_k or ad.top_k(self.src.config),
                         cfg.tcess_threshold)

    def stats_of(self, index: int, layer, hidden, args, want) -> SeedStats:
        """Statistics ``want`` of decoder layer ``index`` as it is now, on ``hidden`` / ``args`` per chunk."""
        E = int(self.src.adapter.router_of(self.src.adapter.block_of(layer)).weight.shape[0])
        return observe_entered(self.src.model, self.src.adapter, index, layer, hidden, args, self.new_stats(E, want))

    def on_layer(self, index: int, layer, inputs) -> None:
        if index not in self.mplan.moe_layers:
            return
        want = self.method.statistics(self.mplan.config)
        stats = self.stats_of(index, layer, inputs.entered[CALIB], inputs.entered_args[CALIB], want) if want else None
        self.kept[index] = self.method.layer(self, index, layer, stats, inputs)

    def on_end(self, model) -> None:
        set_expert_count(model, self.src.adapter, self.pplan.num_keep)


class SeedMethod(PruneMethod):
    needs_calibration = True
    task = False  # the calibration data is the task's (PreMoe, UNCURL)
    touched_what = "REMOVED"

    def statistics(self, config) -> tuple[str, ...]:
        """SeedStats wanted from the original model's inputs of each layer (() for none)."""
        return ("routing",)

    def propagated(self, config) -> bool:
        return False

    def layer(self, step: SeedLayers, index: int, layer, stats, inputs) -> list[int]:
        """Decide and change one MoE layer; record into ``step``; return the kept original ids."""
        raise NotImplementedError

    def report(self, step: SeedLayers) -> dict:
        return {}

    def target(self, skeleton, config):
        return expert_plan(skeleton, config.ratio)

    def check_data(self, config, tokens: int, source: str) -> None:
        if self.task and tokens < config.task_min_tokens:
            raise ValueError(f"'{self.name}' prunes for a task: its task data '{source}' gives {tokens} tokens, fewer "
                             f"than task_min_tokens={config.task_min_tokens}; give more task text (or more/longer "
                             "windows)")

    def check_protection(self, pplan, layer: int, protected: set[int]) -> None:
        pplan.check_protection(layer, protected)

    def check_config(self, skeleton, config) -> None:
        """Method-specific refusals on the skeleton (shapes), before any compute."""

    def plan(self, skeleton, config, profile, calib=None) -> MethodPlan:
        pplan = self.target(skeleton, config)
        if calib is None or calib.ndim != 2 or calib.shape[0] < 1:
            raise ValueError(f"'{self.name}' decides from calibration windows [N, S]; none were given")
        self.check_data(config, int(calib.numel()), "the calibration windows")
        self.check_config(skeleton, config)
        mplan = start_plan(skeleton, config, profile, calib=calib, detail=pplan)
        if config.protect_super_experts:
            for layer, ses in protected_by_layer(mplan.super_experts).items():
                self.check_protection(pplan, layer, ses)
        ad = check_model(skeleton)  # on meta: the final shapes; which experts stay is decided in the pass
        remove_experts(skeleton, ad, {l: list(range(pplan.num_remove)) for l in mplan.moe_layers})
        return mplan

    def step(self, src, mplan: MethodPlan, progress: bool = True) -> SeedLayers:
        if src.resident and self.changes_weights:  # a streamed layer must match the skeleton's shapes anyway
            check_widths(src.model, self.name)
        return SeedLayers(src, mplan, self)

    def result(self, mplan, step: SeedLayers, profile, data_source, ppl=(None, None), seconds=0.0, **kw):
        return make_result(mplan, step.kept, profile, data_source, touched=sorted(set(step.touched)),
                           extra={self.name: self.report(step)}, ppl=ppl, seconds=seconds,
                           touched_what=self.touched_what, **kw)
