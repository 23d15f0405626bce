"""Fake-quantized modules of a scheme: quantized weights (codes kept) and inputs quantized at forward time.

    assignment = layer_assignment(plan, i, adapter, get_scheme("FP8"))     # module -> Scheme or None (16-bit)
    with collect_layer(layer, adapter) as stats: ...                         # actstats: the calibration pass
    scales = static_input_scales(stats, scheme)
    swap_layer(layer, adapter, assignment, scales, shared=stats.shared)      # in place; or layer_swapped(...)

:class:`FakeQuantLinear` replaces an ``nn.Linear``; :class:`FakeQuantExperts` replaces a layer's fused
experts (``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, GPT-OSS transposed with biases: read
through :mod:`secompress.experts`). Each holds its weights as the codes compressed-tensors stores
(FP8 / INT8 values, packed E2M1 pairs) with their scales, and quantizes its input as the server does
(vLLM, see :mod:`secompress.quant.schemes`): a static scale, a per-token / per-group scale computed at
run time, or NVFP4's static global scale with run-time group scales. Fused MoE layers are served with
one input scale per layer (the max over the experts' stored scales for FP8, the smallest NVFP4 global
scale with FlashInfer: ``serving="layer"``) or per expert (vLLM's CUTLASS NVFP4: ``serving="expert"``);
FP8 per-tensor weights that a server fuses (gate/up, q/k/v) are requantized to their largest scale,
as vLLM does on loading. The stored tensors stay those a writer puts on disk.
Legend: E experts, I expert FFN width, H hidden size, O out features, In in features, T tokens.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from ..experts import expert_weights, join_gate_up, layout_of
from ..layout import PROJ
from . import floatq
from .schemes import Scheme

SERVING = ("layer", "expert")


# ---- one quantized weight -----------------------------------------------------------------------
def quantize_weight(w: torch.Tensor, scheme: Scheme, global_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``w [O, In]`` -> {"codes": FP8 / int8 [O, In] or packed FP4 uint8 [O, In/2], "weight_scale", and
    NVFP4's "weight_global_scale"}; scales in ``w``'s dtype as compressed-tensors makes them."""
    a = scheme.weights
    s, g = floatq.weight_scale(w.detach(), a, global_amax)
    q = floatq.quantize(w.detach(), s, a, g)
    out = {"codes": floatq.pack_fp4(q) if a.num_bits == 4 and a.type == "float" else q, "weight_scale": s}
    if g is not None:
        out["weight_global_scale"] = g
    return out


def dequantize_weight(t: dict[str, torch.Tensor], scheme: Scheme, dtype: torch.dtype) -> torch.Tensor:
    a = scheme.weights
    q = t["codes"]
    if a.num_bits == 4 and a.type == "float":
        q = floatq.unpack_fp4(q, t["weight_scale"].dtype if t["weight_scale"].is_floating_point() else dtype)
    s = t["weight_scale"]
    if a.is_mx or s.dtype == floatq.FP8:
        s = s.to(dtype)
    return floatq.dequantize(q, s, a, t.get("weight_global_scale"), dtype)


def quantize_input(x: torch.Tensor, a: floatq.QArgs | None, scale: torch.Tensor | None = None,
                   gscale: torch.Tensor | None = None) -> torch.Tensor:
    """The input as the server quantizes it: static ``scale``, dynamic, or NVFP4 (static ``gscale``)."""
    if a is None:
        return x
    if a.dynamic is True:
        return floatq.qdq(x, floatq.dynamic_scale(x, a), a).to(x.dtype)
    if a.dynamic == "local":
        return floatq.qdq(x, floatq.dynamic_scale(x, a, gscale), a, gscale).to(x.dtype)
    return floatq.qdq(x, scale.to(x.dtype), a).to(x.dtype)


class FakeQuantLinear(nn.Module):
    """An nn.Linear whose weight is quantized per ``scheme`` and whose input is quantized at forward."""

    def __init__(self, lin: nn.Linear, scheme: Scheme, input_scale: torch.Tensor | None = None,
                 global_amax: torch.Tensor | None = None):
        super().__init__()
        self.scheme, self.in_features, self.out_features = scheme, lin.in_features, lin.out_features
        self.weight_dtype = lin.weight.dtype
        for k, v in quantize_weight(lin.weight, scheme, global_amax).items():
            self.register_buffer(k, v)
        a = scheme.inputs
        if a is not None and a.static:
            if input_scale is None:
                raise ValueError(f"scheme {scheme.name} has static input scales: give input_scale")
            self.register_buffer("input_global_scale" if a.has_global_scale else "input_scale", input_scale.reshape(1))
        # FP8 per-tensor weights a server fuses with siblings are requantized to the largest scale
        self.register_buffer("serve_scale", None)  # set by set_serve_scales
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_held(cls, lin: nn.Linear, scheme: Scheme, held: dict[str, torch.Tensor], bias=None) -> "FakeQuantLinear":
        """From stored tensors (codes, scales, input scales): nothing re-quantized."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.scheme, m.in_features, m.out_features, m.weight_dtype = scheme, lin.in_features, lin.out_features, lin.weight.dtype
        for k, v in held.items():
            m.register_buffer(k, v)
        m.register_buffer("serve_scale", None)
        m.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors (codes, scales, input scales), as a writer needs them."""
        return {k: v for k, v in self.named_buffers(recurse=False) if k != "serve_scale" and v is not None}

    @property
    def weight(self) -> torch.Tensor:  # [O, In] dequantized, as served (computed once, then cached)
        key = (self.serve_scale is None, self.weight_scale.data_ptr())
        if self.__dict__.get("_served", (None,))[0] != key:
            w = dequantize_weight(self.tensors(), self.scheme, self.weight_dtype)
            if self.serve_scale is not None:
                w = floatq.qdq(w, self.serve_scale.to(w.dtype), self.scheme.weights).to(w.dtype)
            self.__dict__["_served"] = (key, w)
        return self.__dict__["_served"][1]

    def forward(self, x):
        x = quantize_input(x, self.scheme.inputs, getattr(self, "input_scale", None),
                           getattr(self, "input_global_scale", None))
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


# ---- a layer's fused experts --------------------------------------------------------------------
class FakeQuantExperts(nn.Module):
    """Drop-in for a fused experts module, every expert quantized with one scheme (vLLM serves one
    scheme per fused MoE layer). ``input_scales``: ``experts.<e>.w13`` / ``experts.<e>.w2`` as
    :func:`~secompress.quant.actstats.static_input_scales` gives them (schemes with static inputs)."""

    def __init__(self, experts: nn.Module, scheme: Scheme, input_scales: dict[str, torch.Tensor] | None = None,
                 serving: str = "layer", held: dict[tuple[int, str], dict[str, torch.Tensor]] | None = None):
        super().__init__()
        if serving not in SERVING:
            raise ValueError(f"serving must be one of {SERVING}, got {serving!r}")
        lay = layout_of(experts)
        self.scheme, self.serving, self.num_experts = scheme, serving, experts.num_experts
        self.is_transposed, self.has_bias, self.is_concatenated = lay.transposed, lay.has_bias, lay.concatenated
        self.weight_dtype = experts.down_proj.dtype
        held = held if held is not None else self._quantize(experts, scheme)  # (expert, proj) -> stored tensors
        a = scheme.inputs
        static = "input_global_scale" if a is not None and a.has_global_scale else "input_scale"
        for p in PROJ:  # [E, ...] per projection
            for k in held[(0, p)]:
                if k not in ("input_scale", "input_global_scale"):
                    self.register_buffer(f"{p}__{k}", torch.stack([held[(e, p)][k] for e in range(self.num_experts)]))
        if a is not None and a.static:
            for kind, p in (("w13", "gate_proj"), ("w2", "down_proj")):
                if input_scales is not None:
                    vals = [input_scales[f"experts.{e}.{kind}"].reshape(1) for e in range(self.num_experts)]
                elif static in held[(0, p)]:
                    vals = [held[(e, p)][static].reshape(1) for e in range(self.num_experts)]
                else:
                    raise ValueError(f"scheme {scheme.name} has static input scales: give input_scales")
                self.register_buffer(f"{kind}_{static}", torch.cat(vals))
        if lay.has_bias:
            self.register_buffer("gate_up_proj_bias", experts.gate_up_proj_bias.detach().clone())  # [E, 2I]
            self.register_buffer("down_proj_bias", experts.down_proj_bias.detach().clone())  # [E, H]
        self.__dict__["shell"] = experts  # its _apply_gate (activation, clamp, de-interleave) is used
        with torch.no_grad():
            for name, p in list(experts.named_parameters(recurse=False)):
                setattr(experts, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))

    @staticmethod
    def _quantize(experts, scheme: Scheme) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
        nvfp4 = scheme.weights.has_global_scale
        out = {}
        for e in range(experts.num_experts):
            w = expert_weights(experts, e)
            gamax = torch.maximum(w["gate_proj"].abs().amax(), w["up_proj"].abs().amax()) if nvfp4 else None
            for p in PROJ:  # gate/up share NVFP4's global scale (llm-compressor fuses their observers)
                out[(e, p)] = quantize_weight(w[p], scheme, gamax if p != "down_proj" else None)
        return out

    @classmethod
    def from_held(cls, experts, scheme: Scheme, held, serving: str = "layer") -> "FakeQuantExperts":
        """From stored tensors ((expert, proj) -> codes, scales, input scales): nothing re-quantized."""
        return cls(experts, scheme, None, serving, held)

    def tensors(self, e: int, proj: str) -> dict[str, torch.Tensor]:
        """Expert ``e``'s ``proj`` stored tensors: codes, weight_scale(, weight_global_scale), input scale."""
        out = {k.split("__", 1)[1]: v[e] for k, v in self.named_buffers(recurse=False) if k.startswith(proj + "__")}
        kind = "w2" if proj == "down_proj" else "w13"
        for name in ("input_scale", "input_global_scale"):
            if hasattr(self, f"{kind}_{name}"):
                out[name] = getattr(self, f"{kind}_{name}")[e].reshape(1)
        return out

    def served_input_scale(self, kind: str, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(static scale, NVFP4 global scale) the server applies to expert ``e``'s ``kind`` input."""
        s, g = getattr(self, f"{kind}_input_scale", None), getattr(self, f"{kind}_input_global_scale", None)
        if s is not None:
            s = s.max() if self.serving == "layer" else s[e]  # vLLM FP8: max over the layer's experts
        if g is not None:
            g = (g.min() if self.serving == "layer" else g[e]).reshape(1)  # FlashInfer: max of 1/g
        return s, g

    def expert_weight(self, e: int, proj: str, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_weight(self.tensors(e, proj), self.scheme, dtype)

    def _served(self, e: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``'s weights as served: w13 [2I, H] in the module's gate/up order, w2 [H, I] (cached)."""
        cache = self.__dict__.setdefault("_cache", {})
        if (e, dtype) not in cache:
            g, u = self.expert_weight(e, "gate_proj", dtype), self.expert_weight(e, "up_proj", dtype)
            a = self.scheme.weights
            if a.strategy == "tensor" and a.type == "float":  # vLLM requantizes w1/w3 to max(scale_w1, scale_w3)
                smax = torch.maximum(self.gate_proj__weight_scale[e], self.up_proj__weight_scale[e]).to(dtype)
                g, u = floatq.qdq(g, smax, a).to(dtype), floatq.qdq(u, smax, a).to(dtype)
            cache[(e, dtype)] = (join_gate_up(g, u, self.is_concatenated), self.expert_weight(e, "down_proj", dtype))
        return cache[(e, dtype)]

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, K], [T, K]
        out = torch.zeros_like(hidden_states)
        a, dt = self.scheme.inputs, hidden_states.dtype
        hit = torch.unique(top_k_index)
        for e in hit.tolist():
            if e >= self.num_experts:
                continue
            slot_tok = torch.where(top_k_index == e)
            tok, slot = slot_tok[0], slot_tok[1]
            x = quantize_input(hidden_states[tok], a, *self.served_input_scale("w13", e))
            w13, w2 = self._served(e, dt)
            gu = F.linear(x, w13)  # [c, 2I]
            if self.has_bias:
                gu = gu + self.gate_up_proj_bias[e].to(dt)
            act = self.shell._apply_gate(gu)  # [c, I]
            act = quantize_input(act, a, *self.served_input_scale("w2", e))
            y = F.linear(act, w2)  # [c, H]
            if self.has_bias:
                y = y + self.down_proj_bias[e].to(dt)
            out[tok] += (y * top_k_weights[tok, slot, None]).to(out.dtype)  # a token meets an expert once
        return out

    def _apply_gate(self, gu):
        return self.shell._apply_gate(gu)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, scheme={self.scheme.name}, serving={self.serving}"


# ---- which module gets which scheme, and the swap ---------------------------------------------------
def layer_assignment(plan, index: int, adapter, scheme: Scheme, se_scheme: Scheme | None = None
                     ) -> dict[str, Scheme | None]:
    """Decoder layer ``index``'s quantized modules (names inside the layer; ``experts`` for the routed
    experts) -> their scheme. A unit the plan keeps 16-bit maps to None; units Super-Expert protection
    raised (source ``se``) get ``se_scheme`` (e.g. FP8_DYNAMIC: its own config group) or stay 16-bit."""
    prefix = f"{adapter.layers_path}.{index}."
    out: dict[str, Scheme | None] = {}
    experts: set = set()
    for name, u in plan.units.items():
        if u.layer != index:
            continue
        chosen = None if plan.bits[name] is None else scheme
        if plan.source[name] == "se":
            chosen = se_scheme
        if u.expert is None:
            out[name[len(prefix):]] = chosen
        else:
            experts.add(chosen)
    if len(experts) > 1:
        raise ValueError(f"layer {index}: experts planned with several schemes {sorted(map(str, experts))}: a fused "
                         "MoE layer is served with one scheme (se_mode: layer)")
    if experts:
        out[adapter.experts] = experts.pop()
    return out


def set_serve_scales(layer, shared) -> None:
    """FP8 per-tensor weights of Linear groups a server fuses (``shared``: names reading one tensor) are
    requantized to the group's largest weight scale, as vLLM does when it loads merged q/k/v or gate/up."""
    for group in shared:
        mods = [m for m in (layer.get_submodule(n) for n in group) if isinstance(m, FakeQuantLinear)]
        if len(mods) < 2 or len({m.scheme.name for m in mods}) != 1:
            continue
        a = mods[0].scheme.weights
        if a.type == "float" and a.strategy == "tensor":
            top = torch.stack([m.weight_scale.reshape(()) for m in mods]).max().reshape(1)
            for m in mods:
                m.serve_scale = None if torch.equal(m.weight_scale.reshape(1), top) else top


def _global_amax(layer, assignment, shared) -> dict[str, torch.Tensor]:
    """NVFP4: Linear groups a server fuses share one global scale (llm-compressor's fused observers)."""
    out = {}
    for group in shared:
        names = [n for n in group if isinstance(assignment.get(n), Scheme) and assignment[n].weights.has_global_scale]
        if len(names) > 1:
            top = torch.stack([layer.get_submodule(n).weight.detach().abs().amax() for n in names]).max()
            out.update({n: top for n in names})
    return out


def swap_layer(layer: nn.Module, adapter, assignment: dict[str, Scheme | None], scales: dict[str, torch.Tensor],
               shared=(), serving: str = "layer") -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """Replace the assigned modules of ``layer`` in place; returns the swaps (parent, attribute, old, new)."""
    swaps = []
    gamax = _global_amax(layer, assignment, shared)
    for name, sch in assignment.items():
        if sch is None or name == adapter.experts:
            continue
        lin = layer.get_submodule(name)
        new = FakeQuantLinear(lin, sch, scales.get(name), gamax.get(name))
        parent, _, attr = name.rpartition(".")
        swaps.append((layer.get_submodule(parent) if parent else layer, attr, lin, new))
    sch = assignment.get(adapter.experts)
    if sch is not None:
        block = adapter.block_of(layer)
        old = adapter.experts_of(block)
        saved = {n: p for n, p in old.named_parameters(recurse=False)}
        swaps.append((block, adapter.experts, old, FakeQuantExperts(old, sch, scales, serving)))
        swaps[-1][3].__dict__["saved"] = saved  # the 16-bit parameters, put back if the swap is undone
    for parent, attr, _, new in swaps:
        setattr(parent, attr, new)
    set_serve_scales(layer, shared)
    return swaps


def unswap(swaps) -> None:
    """Undo :func:`swap_layer`: the original modules (and the experts' 16-bit parameters) come back."""
    for parent, attr, old, new in reversed(swaps):
        setattr(parent, attr, old)
        for n, p in new.__dict__.get("saved", {}).items():
            setattr(old, n, p)


@contextmanager
def layer_swapped(layer, adapter, assignment, scales, shared=(), serving: str = "layer"):
    """:func:`swap_layer` for the duration of the block."""
    swaps = swap_layer(layer, adapter, assignment, scales, shared, serving)
    try:
        yield layer
    finally:
        unswap(swaps)
