"""GPTQ's input statistics of one decoder layer, recorded by hooks that undo themselves.

    with record_hessians(linears, experts, all_experts=False) as rec:
        for c, h in enumerate(hidden):
            run_layer(layer, h, *args[c])
    rec.linear["model.layers.0.self_attn.q_proj"]     # Moments: sum of x^T x [In, In] float32, rows
    rec.experts["model.layers.0.mlp.experts"]         # ExpertMoments: per expert gate/up and down sums

For each given ``nn.Linear`` (attention projections, shared expert, dense MLP) a forward pre-hook
adds ``x^T x`` of its input (float32, as gptqmodel and llm-compressor accumulate); Linear layers
that receive the very same input tensor (q/k/v, a shared expert's gate/up) share one
:class:`Moments` object, computed once. transformers 5 keeps a layer's routed experts fused
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; GPT-OSS transposed, with biases), so hooks
on ``nn.Linear`` see nothing: the experts module's forward is swapped, as
:mod:`secompress.instrument` does, for one that computes expert by expert with
:func:`~secompress.experts.expert_act` / :func:`~secompress.experts.expert_down` and adds, for each
recorded expert, its gate/up input (the tokens routed to it) and its down_proj input (its
activation). ``all_experts``: every token goes through every recorded expert for the statistics
(gptqmodel's ``ExpertsRoutingBypass``, llm-compressor's ``moe_calibrate_all_experts``); the
module's output still combines the routed experts only. Every expert's gate/up input is then the
same matrix, summed once. Leaving the block removes every hook and restores every forward.
Legend: T tokens, H hidden size, I expert FFN size, E experts, n recorded experts, K top-k.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SecompressError
from .experts import expert_act, expert_down, expert_forward, expert_weights


@dataclass
class Moments:
    """``xtx`` [In, In] float32: the sum of ``x^T x`` over ``rows`` input rows; ``owner``: the Linear
    whose hook adds them (others listed with this object receive the same input)."""

    xtx: torch.Tensor
    rows: int = 0
    owner: str = ""

    def add(self, x: torch.Tensor) -> None:
        t = x.reshape(-1, x.shape[-1]).float()  # [T, In]
        self.xtx.addmm_(t.T, t)
        self.rows += t.shape[0]


@dataclass
class ExpertMoments:
    """The recorded experts ``ids`` of one experts module: ``gate_up`` [n, H, H] sums of their
    gate/up inputs (or [H, H], ``shared``: one for all, under all-expert calibration), ``down``
    [n, I, I] of their down_proj inputs, ``tokens`` [n] the rows each expert's sums hold."""

    ids: list[int]
    gate_up: torch.Tensor
    down: torch.Tensor
    tokens: list[int]
    shared: bool = False

    def index(self, e: int) -> int:
        return self.ids.index(e)


@dataclass
class LayerMoments:
    linear: dict[str, Moments] = field(default_factory=dict)  # name -> Moments (shared when the input is)
    experts: dict[str, ExpertMoments] = field(default_factory=dict)
    _last: tuple | None = field(default=None, repr=False)  # (input tensor, Moments) of the last Linear hook


def _linear_hook(rec: LayerMoments, name: str, weight: torch.Tensor):
    def hook(mod, args):
        x = args[0]
        same = rec._last is not None and rec._last[0] is x
        m = rec.linear.get(name)
        if m is None:
            if same:  # first call: the previous Linear got this very tensor, share its sums
                rec.linear[name] = rec._last[1]
                return
            m = rec.linear[name] = Moments(torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32,
                                                       device=weight.device), owner=name)
        elif m.owner != name:  # its owner's hook added this input already
            if not (same and rec._last[1] is m):
                raise SecompressError(f"'{name}' stopped sharing its input with '{m.owner}' between forwards")
            return
        m.add(x)
        rec._last = (x, m)
    return hook


def _experts_forward(st: ExpertMoments, all_experts: bool):
    """A forward for an experts module that adds the recorded experts' input statistics to ``st``."""
    where = {e: p for p, e in enumerate(st.ids)}

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, K], [T, K]
        E, K, T = self.num_experts, top_k_index.shape[-1], hidden_states.shape[0]
        out = torch.zeros_like(hidden_states)  # [T, H]
        flat = top_k_index.reshape(-1)  # [T*K]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E + 1)[:E].tolist()  # ids >= E are EP sentinels
        if all_experts and where:
            x = hidden_states.float()
            st.gate_up.addmm_(x.T, x)  # every expert's gate/up input: all tokens
            del x
        start = 0
        for e, c in enumerate(counts):
            sel = order[start : start + c]
            start += c
            tok, slot = sel // K, sel % K  # [c]
            p = where.get(e)
            if p is None:  # not recorded: its routed rows only
                if c == 0:
                    continue
                _, y = expert_forward(self, e, hidden_states[tok])
            elif all_experts:
                act = expert_act(self, e, hidden_states)  # [T, I]: every token
                a = act.float()
                st.down[p].addmm_(a.T, a)
                st.tokens[p] += T
                del a
                if c == 0:
                    continue
                y = expert_down(self, e, act[tok])  # [c, H]: only the routed rows reach the output
            else:
                if c == 0:
                    continue
                x = hidden_states[tok]  # [c, H]
                act = expert_act(self, e, x)  # [c, I]
                xf, a = x.float(), act.float()
                st.gate_up[p].addmm_(xf.T, xf)
                st.down[p].addmm_(a.T, a)
                st.tokens[p] += c
                del xf, a
                y = expert_down(self, e, act)
            out.index_add_(0, tok, (y * top_k_weights[tok, slot][:, None]).to(out.dtype))
        return out

    return forward


@contextmanager
def record_hessians(linears: dict[str, nn.Linear], experts: dict[str, tuple[nn.Module, list[int]]] | None = None,
                    all_experts: bool = False):
    """Record the input statistics of ``linears`` ({name: nn.Linear}) and of the listed experts of each
    experts module (``experts``: {key: (module, expert ids)}); yields a :class:`LayerMoments`."""
    rec = LayerMoments()
    handles, swapped = [], []
    try:
        for name, lin in linears.items():
            handles.append(lin.register_forward_pre_hook(_linear_hook(rec, name, lin.weight)))
        for key, (mod, ids) in (experts or {}).items():
            ids = sorted(ids)
            if not ids:
                continue
            w = expert_weights(mod, ids[0])
            H, I = w["gate_proj"].shape[1], w["down_proj"].shape[1]
            dev = w["down_proj"].device
            n = len(ids)
            st = ExpertMoments(ids, torch.zeros((H, H) if all_experts else (n, H, H), dtype=torch.float32, device=dev),
                               torch.zeros(n, I, I, dtype=torch.float32, device=dev), [0] * n, shared=all_experts)
            rec.experts[key] = st
            swapped.append((mod, mod.__dict__.get("forward")))
            mod.forward = types.MethodType(_experts_forward(st, all_experts), mod)
        yield rec
    finally:
        for h in handles:
            h.remove()
        for mod, prev in swapped:
            if prev is None:
                del mod.forward  # back to the class's forward
            else:
                mod.forward = prev
        rec._last = None
