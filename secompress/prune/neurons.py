"""HEAPr neuron pruning per MoE layer: statistics -> decision -> applied to the layer.

    keep = decide_neurons(stats, width, protected_neurons)      # one layer, [E, width] ids
    apply_neurons(block, adapter, keep)                         # that layer's experts, in place
    finish_neurons(model, adapter, width)                       # config.<intermediate_key>

Every expert of every MoE layer keeps ``width`` neurons (stock checkpoints hold one
``moe_intermediate_size``). With protection, a Super Expert's neurons that write its massive
channel on the massive token (found from the calibration pass tracking the profile's
channel, :func:`secompress.prune.heapr.massive_neurons`) are kept whatever their score.
Shared experts are never touched. Legend: E experts, I FFN width before, I' after.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import MoEAdapter
from ..experts import expert_weights
from .heapr import massive_neurons, nonuniform_widths, retained, select_neurons
from .layer_stats import LayerStats
from .structural import keep_layer_neurons, set_intermediate_size

log = logging.getLogger(__name__)


@dataclass
class NeuronDecision:
    keep: torch.Tensor  # [E, I'] kept neuron ids per expert
    protected: dict[int, list[int]]  # expert -> neurons kept for its massive channel
    retained_uniform: float  # share of the layer's HEAPr score kept
    retained_nonuniform: float  # the same with the layer's best E*I' neurons (per-expert widths)
    nonuniform_widths: list[int]  # [E] those per-expert widths

    def to_json(self) -> dict:
        return {"protected_neurons": {str(e): v for e, v in self.protected.items()},
                "retained_score_uniform": round(self.retained_uniform, 6),
                "retained_score_nonuniform": round(self.retained_nonuniform, 6),
                "nonuniform_widths": self.nonuniform_widths}


def se_neurons(experts: nn.Module, stats: LayerStats, ses: dict[int, int]) -> dict[int, list[int]]:
    """{SE expert: the neurons writing its channel ``ses[e]`` on its massive token}."""
    out = {}
    for e, ch in ses.items():
        if e not in stats.massive:
            continue  # no calibration token reached it: nothing to find
        w = expert_weights(experts, e)
        bias = float(w["down_proj_bias"][ch].detach()) if "down_proj_bias" in w else 0.0
        out[e] = massive_neurons(stats.massive[e][1], w["down_proj"][ch].detach().cpu(), bias)
    return out


def decide_neurons(stats: LayerStats, width: int, protected: dict[int, list[int]] | None = None) -> NeuronDecision:
    """Each expert's ``width`` best neurons by HEAPr score, ``protected`` ones first. An SE whose
    massive channel needs more than ``width`` neurons keeps its ``width`` largest writers (warned)."""
    scores = stats.heapr  # [E, I]
    protected = dict(protected or {})
    for e, js in protected.items():
        if len(js) > width:
            log.warning("Super Expert %d writes its massive channel with %d neurons, more than the kept width %d: "
                        "keeping its %d largest writers", e, len(js), width, width)
            protected[e] = js[:width]
    keep = select_neurons(scores, width, protected)
    widths = nonuniform_widths(scores, width)
    best = torch.topk(scores.reshape(-1), scores.shape[0] * width).values.sum()
    total = float(scores.sum())
    return NeuronDecision(keep, protected, retained(scores, keep),
                          float(best) / total if total > 0 else 1.0, widths.tolist())


def apply_neurons(block: nn.Module, adapter: MoEAdapter, keep: torch.Tensor) -> None:
    keep_layer_neurons(adapter.experts_of(block), keep)


def finish_neurons(model: nn.Module, adapter: MoEAdapter, width: int) -> None:
    set_intermediate_size(model, adapter, width)
