"""What a prune method is: one object per method, looked up by name in :data:`~.PRUNE_METHODS`.

    target(skeleton, config)                  refuse a ratio the router or the width cannot take (ValueError)
    check_data(config, tokens, source)        refuse calibration data it cannot use (optional; task methods)
    plan(skeleton, config, profile, calib)    decide what can be decided before any weight is read; give the
                                              meta ``skeleton`` its final shapes and config (-> MethodPlan)
    step(src, mplan, progress)                the per-layer step (statistics -> decision -> apply) for a pass
                                              over ``src`` (resident or streamed: it does not ask which)
    result(mplan, step, ...)                  the PruneResult (report) once the pass is over

A method whose decisions need calibration windows (merging, HEAPr, NAEE) opens the
:data:`CALIB` stream in its step: a ``before`` stream with ``keep_inputs``, so each layer is
decided from the hidden states entering it in the original model. Super Experts (Su et al. 2025,
arXiv 2507.23279) are never removed, merged into or split unless protection is switched off.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

CALIB = "calibration"  # the stream of calibration windows a method decides from (original model's inputs)


@dataclass
class MethodPlan:
    """What a method decided before the pass, on the meta skeleton."""

    config: object  # PruneConfig
    skeleton: nn.Module  # meta: the pruned model's final shapes and config
    moe_layers: list[int]
    num_experts: int  # E before
    sizes_before: tuple[int, int]  # (parameters, bytes) before, in the compute dtype
    super_experts: list  # the profile's SE ids (absolute rule)
    kept: dict[int, list[int]] | None = None  # original ids each MoE layer keeps, when known up front
    detail: object = None  # method-specific (a Selection, a RestructurePlan, ...)
    calib: object = None  # [N, S] calibration windows the step decides from (None: none needed)
    extra: dict = field(default_factory=dict)


class PruneMethod(ABC):
    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False  # decides from calibration windows (not only the profile)
    changes_weights: ClassVar[bool] = False  # writes new weights (merging, neurons): no FP8-as-stored copy
    what: ClassVar[str] = "experts"  # what `ratio` is a share of: each layer's routed experts, or "width"

    @abstractmethod
    def target(self, skeleton: nn.Module, config):
        ...

    def check_data(self, config, tokens: int, source: str) -> None:
        """Refuse calibration data this method cannot use (ValueError), before the profile or any pass:
        ``tokens`` calibration tokens from ``source``. Default: anything goes."""

    @abstractmethod
    def plan(self, skeleton: nn.Module, config, profile, calib) -> MethodPlan:
        ...

    @abstractmethod
    def step(self, src, mplan: MethodPlan, progress: bool = True):
        ...

    @abstractmethod
    def result(self, mplan: MethodPlan, step, profile, data_source: str, ppl: tuple, seconds: float):
        ...


def expert_plan(skeleton: nn.Module, ratio: float):
    """The validated :class:`~secompress.prune.select.PrunePlan` for removing ``ratio`` of each MoE layer's
    routed experts of ``skeleton`` (a clear ValueError when the router cannot take it)."""
    from ...checkpoints import check_model
    from ..select import make_plan

    adapter = check_model(skeleton)
    cfg = skeleton.config
    groups = tuple(getattr(cfg, k, None) for k in adapter.group_keys) if adapter.group_keys else None
    return make_plan(ratio, adapter.num_experts(cfg), adapter.top_k(cfg), groups, adapter.min_experts_per_group)


def start_plan(skeleton: nn.Module, config, profile, calib=None, **kw) -> MethodPlan:
    """A :class:`MethodPlan` with what every method records before it reshapes ``skeleton``."""
    from ...checkpoints import check_model
    from ...profile import check_profile_matches
    from ..structural import model_size

    adapter = check_model(skeleton)
    check_profile_matches(profile, skeleton)
    return MethodPlan(config, skeleton, adapter.moe_layer_indices(skeleton), adapter.num_experts(skeleton.config),
                      model_size(skeleton), profile.se_ids(), calib=calib, **kw)
