"""Per-MoE-layer calibration statistics of the seed methods (PreMoe, UNCURL, DERN, STUN); no decisions.

:class:`SeedStats` accumulates, for one MoE layer, from what its experts module and router see
(``x [T, H]``, top-k ids and weights, router logits ``[T, E]``: the tuple
:func:`secompress.prune.layer_stats.capture` stores), only what was asked for (``want``):
  routing  freq [E] routed-token counts, gate_sum [E] routing-weight sums       (all four)
  tcess    tcess_sum [E] PreMoe's TCESS markers summed (top ``k``, threshold r) (PreMoe)
  gram     gram [E, E] sum_t l_t l_t^T of the router logits                      (UNCURL)
  coact    coact [E, E] tokens whose top-k holds both experts                     (STUN stage 1)
  wanda    in_sq [E, H] / act_sq [E, I]: sums of squared gate_up / down_proj
           inputs over the tokens routed to each expert                           (STUN stage 2)
All are sums over tokens, [E]- or [E, E]-sized (no [T, E] is kept), so chunks, streams and layer
sources only add up. :func:`collect_seed` is the in-memory driver (hooks on every MoE layer, one
forward per batch); the seed methods' per-layer step (:mod:`secompress.prune.methods.seed`) reruns
one layer on its chunks through :func:`secompress.prune.layer_stats.observe_entered`, which calls
:meth:`SeedStats.observe_captured`.
Legend: T tokens, K top-k, E experts, H hidden size, I expert FFN size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import MoEAdapter
from ..experts import expert_forward
from .layer_stats import capture
from .premoe_math import tcess_sum

SEED_WANTS = ("routing", "tcess", "gram", "coact", "wanda")


@dataclass
class SeedStats:
    num_experts: int
    want: frozenset = frozenset({"routing"})
    tcess_k: int = 1  # PreMoe: top-k logits per token that count
    tcess_r: float = 0.0  # PreMoe: confidence threshold on the top-k softmax
    tokens: int = 0
    freq: torch.Tensor = None  # [E]
    gate_sum: torch.Tensor = None  # [E]
    tcess_sum: torch.Tensor | None = None  # [E]
    gram: torch.Tensor | None = None  # [E, E]
    coact: torch.Tensor | None = None  # [E, E]
    in_sq: torch.Tensor | None = None  # [E, H]
    act_sq: torch.Tensor | None = None  # [E, I]
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        bad = set(self.want) - set(SEED_WANTS)
        if bad:
            raise ValueError(f"unknown statistics {sorted(bad)}; known: {SEED_WANTS}")
        E = self.num_experts
        self.freq = torch.zeros(E, dtype=torch.float64)
        self.gate_sum = torch.zeros(E, dtype=torch.float64)

    @torch.no_grad()
    def observe(self, experts: nn.Module, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor,
                logits: torch.Tensor | None = None) -> None:
        """One batch: x [T, H] the experts' input, top_idx / top_w [T, K], logits [T, E]."""
        E = self.num_experts
        x = x.reshape(-1, x.shape[-1])
        T = x.shape[0]
        idx, w = top_idx.reshape(T, -1).cpu(), top_w.reshape(T, -1).double().cpu()
        valid = idx < E  # ids >= E: expert-parallel sentinels
        self.tokens += T
        self.freq += torch.bincount(idx[valid], minlength=E)[:E].double()
        self.gate_sum += torch.zeros(E, dtype=torch.float64).index_add_(0, idx[valid], w[valid])
        if {"tcess", "gram"} & self.want:
            if logits is None:
                raise ValueError("PreMoe / UNCURL statistics need the router logits")
            lg = logits.reshape(T, -1).double().cpu()  # [T, E]
            if "tcess" in self.want:
                s = tcess_sum(lg, self.tcess_k, self.tcess_r)
                self.tcess_sum = s if self.tcess_sum is None else self.tcess_sum + s
            if "gram" in self.want:
                g = lg.T @ lg
                self.gram = g if self.gram is None else self.gram + g
        if "coact" in self.want:
            onehot = torch.zeros(T, E + 1, dtype=torch.float64).scatter_(1, idx.clamp(max=E), 1.0)[:, :E]  # [T, E]
            c = onehot.T @ onehot
            c.fill_diagonal_(0.0)
            self.coact = c if self.coact is None else self.coact + c
        if "wanda" in self.want:
            self._observe_wanda(experts, x, idx)

    def _observe_wanda(self, experts: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> None:
        E = self.num_experts
        for e in range(E):
            tok = torch.where((idx == e).any(1))[0]  # [c]
            if tok.numel() == 0:
                continue
            xe = x[tok.to(x.device)]
            act, _ = expert_forward(experts, e, xe)  # [c, I]
            if self.in_sq is None:
                self.in_sq = torch.zeros(E, x.shape[1], dtype=torch.float64)
                self.act_sq = torch.zeros(E, act.shape[1], dtype=torch.float64)
            self.in_sq[e] += xe.double().pow(2).sum(0).cpu()
            self.act_sq[e] += act.double().pow(2).sum(0).cpu()

    def observe_captured(self, experts: nn.Module, s: dict) -> None:
        """:meth:`observe` on what :func:`capture` stored for this layer."""
        self.observe(experts, s["x"], s["idx"], s["w"], s.get("logits"))

    def tcess(self) -> torch.Tensor:
        """PreMoe's TCESS [E] of this layer (mean marker per token)."""
        return self.tcess_sum / max(1, self.tokens)


def collect_seed(model: nn.Module, adapter: MoEAdapter, ids: torch.Tensor, batch_size: int, want,
                 tcess_k: int = 1, tcess_r: float = 0.0, layers: list[int] | None = None,
                 progress: bool = False) -> dict[int, SeedStats]:
    """Statistics of every MoE layer (or ``layers``) over calibration windows ``ids [N, S]``, in memory.
    The layers see the hidden states of ``model`` as it is (the original model: the ``entered``
    stream; an already-changed model: the propagated one)."""
    layers = adapter.moe_layer_indices(model) if layers is None else layers
    blocks = {l: adapter.block_of(adapter.layers(model)[l]) for l in layers}
    stats = {l: SeedStats(int(adapter.router_of(b).weight.shape[0]), frozenset(want), tcess_k, tcess_r)  # E of the layer
             for l, b in blocks.items()}
    dev = next(model.parameters()).device
    for chunk in tqdm(ids.split(batch_size), desc="calibration statistics", unit="batch", disable=not progress):
        store: dict = {}
        with capture(model, adapter, layers, store, False), torch.no_grad():
            model(input_ids=chunk.to(dev), use_cache=False)
        for l in layers:
            stats[l].observe_captured(adapter.experts_of(blocks[l]), store[l])
    return stats
