"""Remove routed experts from a model for real: smaller tensors, smaller config.

For every MoE layer, in place:
  - every tensor of the fused experts module is per expert ([E, ...]: gate_up_proj,
    down_proj and, for GPT-OSS, their biases) and is sliced to the kept experts;
  - the router's weight rows [E, H] and each tensor in ``adapter.router_per_expert``
    ([E]: DeepSeek-V3 ``e_score_correction_bias``, GPT-OSS router ``bias``) likewise;
  - the expert-count attribute of the experts module, the router and the model
    (transformers stores ``num_experts`` on each) becomes E';
then the config's ``adapter.num_experts_key`` becomes E'. Shared experts and the
Qwen2-MoE shared-expert gate are untouched. Kept experts keep their order, so with
grouped routing each stays in its group, and their weights are copied bit for bit.
Legend: E experts before, E' after, H hidden size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import MoEAdapter
from ..experts import expert_weights, fused_from
from ..errors import SecompressError
from ..layout import PerExpertExperts

log = logging.getLogger(__name__)
COUNT_ATTR = "num_experts"  # the expert count transformers stores on experts modules, routers and models


class SizeDelta:
    """Parameters and bytes saved, for anything with *_before / *_after counts."""

    @property
    def params_saved(self) -> int:
        return self.params_before - self.params_after

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after


@dataclass
class RemovalReport(SizeDelta):
    num_experts_before: int
    num_experts_after: int
    kept: dict[int, list[int]]  # layer -> original ids of the kept experts, in their new order
    removed: dict[int, list[int]]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    sliced: list[str] = field(default_factory=list)  # qualified names of the tensors that were sliced


def model_size(model: nn.Module) -> tuple[int, int]:
    """(parameter count, bytes of parameters and buffers); shared tensors counted once."""
    seen, n, b = set(), 0, 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, nn.Parameter):
            n += t.numel()
        b += t.numel() * t.element_size()
    return n, b


def _slice_tensor(owner: nn.Module, name: str, idx: torch.Tensor, E: int, where: str) -> None:
    t = getattr(owner, name)
    if not isinstance(t, torch.Tensor) or t.shape[0] != E:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise SecompressError(f"{where}.{name}: expected a tensor indexed by expert ([{E}, ...]), got {shape}")
    new = t.detach().index_select(0, idx.to(t.device))  # a new tensor (never a view): one copy of the kept rows
    if isinstance(t, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:  # a buffer: assigning through __setattr__ keeps it registered (and its persistence)
        setattr(owner, name, new)


def _set_count(module: nn.Module, E_new: int) -> None:
    if isinstance(getattr(module, COUNT_ATTR, None), int):
        setattr(module, COUNT_ATTR, E_new)


@torch.no_grad()
def keep_layer_experts(block: nn.Module, adapter: MoEAdapter, keep: list[int], path: str = "") -> list[str]:
    """One MoE layer keeps only the experts ``keep`` (original ids, in this order): every
    per-expert tensor of the experts module and of the router is sliced, the counts on the
    modules set to E'. The per-layer half of :func:`remove_experts` (no validation, no config)."""
    experts, router = adapter.experts_of(block), adapter.router_of(block)
    E = int(router.weight.shape[0])  # [E, H]
    idx = torch.tensor(keep, dtype=torch.long, device="cpu")  # host index list; moved to each tensor's device
    sliced = []
    for name in [n for n, _ in experts.named_parameters(recurse=False)] + \
            [n for n, _ in experts.named_buffers(recurse=False)]:
        _slice_tensor(experts, name, idx, E, f"{path}.{adapter.experts}")
        sliced.append(f"{path}.{adapter.experts}.{name}")
    for name in ("weight", *adapter.router_per_expert):
        _slice_tensor(router, name, idx, E, f"{path}.{adapter.router}")
        sliced.append(f"{path}.{adapter.router}.{name}")
    for m in (experts, router, block):
        _set_count(m, len(keep))
    return sliced


def set_expert_count(model: nn.Module, adapter: MoEAdapter, E_new: int) -> None:
    """The model-level half of expert removal: the model's count and ``config.<num_experts_key>``."""
    _set_count(model, E_new)
    setattr(model.config, adapter.num_experts_key, E_new)
    if adapter.num_experts(model.config) != E_new:
        raise SecompressError(f"config.{adapter.num_experts_key} did not take the new expert count {E_new}")


INTERMEDIATE_ATTRS = ("intermediate_dim", "intermediate_size")  # where experts modules store I


@torch.no_grad()
def keep_layer_neurons(experts: nn.Module, keep: torch.Tensor) -> None:
    """Neuron pruning of one fused experts module: expert e keeps intermediate neurons
    ``keep[e]`` ([E, I'] indices, each row in any order; sorted here): its gate/up rows, their
    biases and its down_proj columns. The new I' is set on the module."""
    E = experts.gate_up_proj.shape[0]
    if keep.ndim != 2 or keep.shape[0] != E:
        raise ValueError(f"keep must be [{E}, width], got {tuple(keep.shape)}")
    new = []
    for e in range(E):
        idx = keep[e].sort().values.to(experts.down_proj.device)
        w = expert_weights(experts, e)
        sub = {"gate_proj": w["gate_proj"][idx], "up_proj": w["up_proj"][idx], "down_proj": w["down_proj"][:, idx]}
        if "down_proj_bias" in w:
            sub.update(gate_proj_bias=w["gate_proj_bias"][idx], up_proj_bias=w["up_proj_bias"][idx],
                       down_proj_bias=w["down_proj_bias"])
        new.append(sub)
    for name, t in fused_from(experts, new).items():
        old = getattr(experts, name)
        setattr(experts, name, nn.Parameter(t.clone(), requires_grad=old.requires_grad))
    for attr in INTERMEDIATE_ATTRS:
        if isinstance(getattr(experts, attr, None), int):
            setattr(experts, attr, int(keep.shape[1]))


def shared_multiplier_for(adapter: MoEAdapter, config, width: int) -> int | None:
    """Where the config derives the shared expert's width from the routed one (DeepSeek:
    ``moe_intermediate_size x n_shared_experts``), the multiplier that keeps the shared expert's
    width at the new routed ``width``; a ValueError when none does. None: nothing to adjust."""
    key = adapter.shared_width_multiplier_key
    if key is None or getattr(config, key, None) is None:
        return None
    shared = adapter.intermediate_size(config) * int(getattr(config, key))
    if shared % width:
        raise ValueError(f"the shared expert's width {shared} is config.{adapter.intermediate_key} x config.{key}: "
                         f"a routed width of {width} cannot keep it; choose a width that divides {shared}")
    return shared // width


def set_intermediate_size(model: nn.Module, adapter: MoEAdapter, width: int) -> None:
    """``config.<intermediate_key>`` (each routed expert's FFN width) becomes ``width``; a shared
    expert whose width the config derives from it keeps its width (its multiplier changes)."""
    mult = shared_multiplier_for(adapter, model.config, width)
    setattr(model.config, adapter.intermediate_key, int(width))
    if mult is not None:
        setattr(model.config, adapter.shared_width_multiplier_key, mult)


@torch.no_grad()
def remove_experts(model: nn.Module, adapter: MoEAdapter, removed: dict[int, list[int]]) -> RemovalReport:
    """Remove ``removed[layer]`` (original expert ids) from every MoE layer, in place.

    Every MoE layer must lose the same number of experts (a config holds one count)
    and keep at least top_k. Nothing is changed if any check fails.
    """
    E = adapter.num_experts(model.config)
    top_k = adapter.top_k(model.config)
    moe_layers = adapter.moe_layer_indices(model)
    if sorted(removed) != moe_layers:
        raise ValueError(f"removal lists are needed for exactly the MoE layers {moe_layers}, got {sorted(removed)}")
    counts = {len(set(v)) for v in removed.values()}
    if len(counts) != 1:
        raise ValueError(f"every MoE layer must lose the same number of experts, got {sorted(counts)}")
    E_new = E - counts.pop()
    if E_new < top_k:
        raise ValueError(f"removal keeps {E_new} experts per layer, fewer than top_k={top_k}")
    for layer, ids in removed.items():
        bad = [e for e in ids if not 0 <= int(e) < E]
        if bad:
            raise ValueError(f"layer {layer}: expert ids {bad} out of range 0..{E - 1}")
    layers = adapter.layers(model)
    for layer in moe_layers:
        if isinstance(adapter.experts_of(adapter.block_of(layers[layer])), PerExpertExperts):
            raise SecompressError(f"layer {layer} holds per-expert (defused) experts: prune the fused model")

    params_before, bytes_before = model_size(model)
    kept, sliced = {}, []
    for layer in moe_layers:
        gone = {int(e) for e in removed[layer]}
        keep = [e for e in range(E) if e not in gone]
        sliced += keep_layer_experts(adapter.block_of(layers[layer]), adapter, keep, adapter.block_path(layer))
        kept[layer] = keep
    set_expert_count(model, adapter, E_new)
    params_after, bytes_after = model_size(model)
    log.info("removed %d of %d experts in %d MoE layers (%d parameters)", E - E_new, E, len(moe_layers),
             params_before - params_after)
    return RemovalReport(E, E_new, kept, {l: sorted(int(e) for e in v) for l, v in removed.items()},
                         params_before, params_after, bytes_before, bytes_after, sliced)
