"""Calibration coverage: which experts saw calibration tokens, and a way to show them all.

Calibrated quantizers (GPTQ and kin) estimate each expert's input statistics from the
tokens routed to it; an expert that no calibration token reached has none.
:func:`check_coverage` reports such experts and refuses them unless a fallback
(``"rtn"``: plain round-to-nearest, which needs no statistics) was chosen explicitly.

:func:`all_expert_calibration` is the alternative: during calibration forwards every token
goes through every expert, so hooks on per-expert Linear layers (a defused model,
:mod:`secompress.layout`) or the ``observer`` callback see all tokens, while the model's
output stays that of the routed experts only.
Legend: L decoder layers, E routed experts, T tokens, H hidden, I expert FFN size.
"""
from __future__ import annotations

import logging
import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CalibrationError, option
from ..checkpoints import check_model
from ..experts import expert_forward

log = logging.getLogger(__name__)
FALLBACKS = (None, "rtn")


def expert_tokens(profile) -> dict[tuple[int, int], int]:
    """(layer, routed expert) -> calibration tokens routed to it, over the profile's MoE layers."""
    tok = profile.arrays["tokens"]  # [L, E + 1], last column = shared expert
    return {(l, e): int(tok[l, e]) for l in profile.moe_layers for e in range(profile.num_experts)}


def check_coverage(profile, fallback: str | None = None, experts=None) -> list[tuple[int, int]]:
    """The uncalibrated experts (zero tokens), among ``experts`` if given.

    Raises :class:`CalibrationError` if there are any and ``fallback`` is None.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    counts = expert_tokens(profile)
    wanted = counts if experts is None else {k: counts.get(k, 0) for k in experts}
    missing = sorted(k for k, n in wanted.items() if n == 0)
    if missing and fallback is None:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise CalibrationError(f"{len(missing)} expert(s) got no calibration token: {shown}. Use more or more "
                               f"varied calibration data, all-expert calibration "
                               f"({option('calibration', 'all-experts')}), or {option('fallback', 'rtn')}")
    if missing:
        log.warning("%d uncalibrated expert(s) fall back to %s", len(missing), fallback)
    return missing


@dataclass
class AllExpertStats:
    tokens: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [E] tokens each expert computed


def _all_forward(stats: AllExpertStats, layer: int, observer):
    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, K], [T, K]
        T = hidden_states.shape[0]
        out = torch.zeros_like(hidden_states)
        counts = stats.tokens.setdefault(layer, np.zeros(self.num_experts, dtype=np.int64))
        every = torch.arange(T, device=hidden_states.device)
        for e in range(self.num_experts):
            routed = (top_k_index == e)  # [T, K]
            w_all = (top_k_weights * routed).sum(-1)  # [T] routing weight, 0 where not routed
            self.current_tokens, self.current_weights = every, w_all  # for per-expert hooks
            act, y = expert_forward(self, e, hidden_states)
            counts[e] += T
            if observer is not None:
                observer(layer, e, hidden_states, act, y, routed.any(-1))
            tok, slot = torch.where(routed)  # only routed rows reach the output
            if tok.numel():
                out.index_add_(0, tok, (y[tok] * top_k_weights[tok, slot][:, None]).to(out.dtype))
        self.current_tokens = self.current_weights = None
        return out
    return forward


@contextmanager
def all_expert_calibration(model, observer=None):
    """Inside the block every expert computes every token; outputs combine routed experts only.

    ``observer(layer, expert, x [T, H], act [T, I], y [T, H], routed [T] bool)`` is called per
    expert and layer. Yields an :class:`AllExpertStats`. Restores every module on exit.
    """
    adapter = check_model(model)
    stats, swapped = AllExpertStats(), []
    try:
        for i in adapter.moe_layer_indices(model):
            experts = adapter.experts_of(adapter.block_of(adapter.layers(model)[i]))
            experts.forward = types.MethodType(_all_forward(stats, i, observer), experts)
            swapped.append(experts)
        yield stats
    finally:
        for m in swapped:
            del m.forward  # back to the class's forward
