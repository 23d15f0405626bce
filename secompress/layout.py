"""Convert fused 3D experts into per-expert ``nn.Linear`` modules, and back.

Fused (transformers 5):   gate_up_proj [E, 2I, H], down_proj [E, H, I]
                          (GPT-OSS: transposed, [E, H, 2I] and [E, I, H], interleaved gate/up, biases)
Per-expert (this module): per_expert[e].gate_proj / up_proj [I, H], down_proj [H, I]

GPTQ and other per-``nn.Linear`` tools need the per-expert layout. The per-expert
module computes exactly what the fused one does: it reuses the original module's
``_apply_gate`` (activation, clamping, interleaving) on the re-joined gate/up output.
Legend: T tokens, K top-k, E experts, H hidden, I expert FFN size.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .adapters import MoEAdapter
from .adapters.base import EXPERT_PROJ as PROJ  # the projections of one per-expert MLP
from .experts import expert_forward, expert_weights, layout_of, write_expert


class ExpertMLP(nn.Module):
    def __init__(self, H: int, I: int, bias: bool, dtype, device):
        super().__init__()
        kw = dict(bias=bias, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(H, I, **kw)
        self.up_proj = nn.Linear(H, I, **kw)
        self.down_proj = nn.Linear(I, H, **kw)


class PerExpertExperts(nn.Module):
    """Drop-in replacement for a fused experts module: same forward signature and result."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        lay = layout_of(fused)
        self.num_experts = fused.num_experts
        self.is_concatenated = lay.concatenated
        self._apply_gate = fused._apply_gate  # bound method of the fused module (activation only)
        gu = fused.gate_up_proj  # [E, 2I, H] (transposed: [E, H, 2I])
        H, I2 = (gu.shape[1], gu.shape[2]) if lay.transposed else (gu.shape[2], gu.shape[1])
        self.per_expert = nn.ModuleList(  # built on meta (no random init), then given copies of the weights
            ExpertMLP(H, I2 // 2, lay.has_bias, gu.dtype, "meta") for _ in range(self.num_experts))
        with torch.no_grad():
            for e, m in enumerate(self.per_expert):
                for name, w in expert_weights(fused, e).items():  # gate_proj, ..., down_proj_bias
                    lin = getattr(m, name.removesuffix("_bias"))
                    setattr(lin, "bias" if name.endswith("_bias") else "weight",
                            nn.Parameter(w.detach().clone(memory_format=torch.contiguous_format)))
        self.train(fused.training)  # new modules start in training mode; follow the module replaced
        self.current_tokens: torch.Tensor | None = None  # [c] token ids of the expert running now
        self.current_weights: torch.Tensor | None = None  # [c] their routing weights

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, K], [T, K]
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            tok, slot = torch.where(top_k_index == e)  # [c], [c]
            if tok.numel() == 0:
                continue
            self.current_tokens, self.current_weights = tok, top_k_weights[tok, slot]
            _, y = expert_forward(self, e, hidden_states[tok])  # [c, H]
            out.index_add_(0, tok, (y * self.current_weights[:, None]).to(out.dtype))
        self.current_tokens = self.current_weights = None
        return out


def defuse_model(model: nn.Module, adapter: MoEAdapter) -> nn.Module:
    """Replace every fused experts module by a :class:`PerExpertExperts` (in place)."""
    for layer in adapter.layers(model):
        block = adapter.block_of(layer)
        if block is not None and not isinstance(adapter.experts_of(block), PerExpertExperts):
            setattr(block, adapter.experts, PerExpertExperts(adapter.experts_of(block)))
    return model


@contextmanager
def defused(model: nn.Module, adapter: MoEAdapter):
    """Per-expert layout inside the block; the original fused modules come back on exit.

    Weight changes made inside the block are written back into the fused tensors.
    """
    originals = {}
    for i, layer in enumerate(adapter.layers(model)):
        block = adapter.block_of(layer)
        if block is not None and not isinstance(adapter.experts_of(block), PerExpertExperts):
            originals[i] = adapter.experts_of(block)
    defuse_model(model, adapter)
    try:
        yield model
    finally:
        for i, fused in originals.items():
            block = adapter.block_of(adapter.layers(model)[i])
            per = adapter.experts_of(block)
            refuse_into(per, fused)
            setattr(block, adapter.experts, fused)


@torch.no_grad()
def refuse_into(per: PerExpertExperts, fused: nn.Module) -> None:
    """Write per-expert weights back into the fused 3D tensors."""
    for e, m in enumerate(per.per_expert):
        w = {name: getattr(m, name).weight for name in PROJ}
        if layout_of(fused).has_bias:
            w.update({f"{name}_bias": getattr(m, name).bias for name in PROJ})
        write_expert(fused, e, w)
