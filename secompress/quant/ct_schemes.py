"""compressed-tensors layout of activation-quantization schemes: one layer's tensors, the config, reading back.

    tensors = layer_tensors(layer, i, adapter)          # checkpoint name -> tensor, this decoder layer
    qc = scheme_config(model, assignments, adapter)     # config groups, ignore list (QuantizationConfig)
    read_layer(layer, i, adapter, assignments[i], tensors)   # fake-quantized modules from stored tensors

Written with compressed-tensors' own compressors (``float-quantized``, ``int-quantized``,
``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``, ``pack-quantized``), so names, dtypes and shapes
are what llm-compressor writes and vLLM's loaders place (checked against an llm-compressor export in
tests/test_actquant.py): per quantized module ``weight`` (FP8 / int8) or ``weight_packed`` (uint8
E2M1 pairs; int32 for int4), ``weight_scale`` (the weight's dtype; FP8 for NVFP4; uint8 E8M0
exponents for MXFP4), NVFP4's float32 ``weight_global_scale``, static ``input_scale`` (the weight's
dtype) or NVFP4's float32 ``input_global_scale``. Routed experts are stored per expert under their
checkpoint names. The codes are checked to come back from the compressor unchanged.
Config: one group per scheme; the scheme covering most parameters targets ``Linear``, the others name
their modules (an expert layer by one regex, e.g. a Super-Expert layer's FP8_DYNAMIC group) and come
first; ``ignore`` holds every Linear left 16-bit, the routers and the 16-bit expert layers.
Legend: E experts, O out features, In in features.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SecompressError, require
from ..layout import PROJ
from ..streaming import disk_key
from . import floatq
from .actquant import FakeQuantExperts, FakeQuantLinear, dequantize_weight, set_serve_scales
from .compressed_tensors import _experts_regex, _expert_disk
from .schemes import Scheme


# ---- one weight ---------------------------------------------------------------------------------------
def compress_module(t: dict[str, torch.Tensor], scheme: Scheme, shape: tuple[int, int], dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
    """One quantized module's stored tensors (codes, scales, input scales as held) -> its checkpoint tensors."""
    require("compressed_tensors", "ct", "the compressed-tensors export")
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    # float32 carries every grid value exactly (int8 codes times a bf16 scale do not fit a bf16)
    sd = {"weight": dequantize_weight(t, scheme, torch.float32).cpu(), "weight_scale": t["weight_scale"].cpu()}
    if "weight_global_scale" in t:
        sd["weight_global_scale"] = t["weight_global_scale"].cpu()
    out = dict(compressor.compress(sd, scheme.ct_scheme(["Linear"])))
    got, held = _codes(out, scheme, shape), t["codes"].cpu()
    fp4 = scheme.weights.type == "float" and scheme.weights.num_bits == 4
    if fp4:  # compare values: re-quantizing a dequantized -0.0 gives +0.0; keep the codes as quantized
        got, held_v = floatq.unpack_fp4(got), floatq.unpack_fp4(held)
        out["weight_packed"] = held
    else:
        held_v = held
    if not torch.equal(got.float(), held_v.float()):
        raise SecompressError(f"compressed-tensors did not reproduce the {scheme.name} codes")
    for k in ("input_scale", "input_global_scale"):
        if k in t:
            out[k] = t[k].reshape(1).cpu().clone()  # gate and up share one w13 scale: two tensors on disk
    return {k: v.contiguous() for k, v in out.items()}


def _codes(stored: dict[str, torch.Tensor], scheme: Scheme, shape) -> torch.Tensor:
    """The codes inside compressed tensors: FP8 / int8 ``weight``, packed E2M1 uint8, or int4 unpacked to int8."""
    if scheme.format == "pack-quantized":
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        return unpack_from_int32(stored["weight_packed"], scheme.weight_bits, torch.Size(shape)).to(torch.int8)
    return stored["weight_packed"] if "weight_packed" in stored else stored["weight"]


def stored_to_held(stored: dict[str, torch.Tensor], scheme: Scheme, shape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compress_module`: checkpoint tensors -> codes and scales as the modules hold them."""
    held = {"codes": _codes(stored, scheme, shape)}
    s = stored["weight_scale"]
    if scheme.weights.is_mx:
        s = (2.0 ** (s.to(torch.int32) - 127).float()).to(dtype)
    elif s.dtype == torch.float8_e4m3fn:
        s = s.to(dtype)
    held["weight_scale"] = s
    for k in ("weight_global_scale", "input_scale", "input_global_scale"):
        if k in stored:
            held[k] = stored[k]
    return held


# ---- one layer ------------------------------------------------------------------------------------
def _linear_name(adapter, index: int, name: str) -> str:
    return disk_key(adapter, f"{adapter.layers_path}.{index}.{name}")


def quantized_tensors(layer: nn.Module, index: int, adapter) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of the fake-quantized modules of decoder layer ``index``."""
    out = {}
    for name, m in layer.named_modules():
        if isinstance(m, FakeQuantLinear):
            base = _linear_name(adapter, index, name)
            for k, v in compress_module(m.tensors(), m.scheme, (m.out_features, m.in_features), m.weight_dtype).items():
                out[f"{base}.{k}"] = v
            if m.bias is not None:
                out[f"{base}.bias"] = m.bias.detach().cpu().contiguous()
        elif isinstance(m, FakeQuantExperts):
            for e in range(m.num_experts):
                for p in PROJ:
                    t = m.tensors(e, p)
                    shape = tuple(m.expert_weight(e, p, m.weight_dtype).shape)
                    for k, v in compress_module(t, m.scheme, shape, m.weight_dtype).items():
                        out[f"{_expert_disk(adapter, index, e, p)}.{k}"] = v
    return out


def layer_tensors(layer: nn.Module, index: int, adapter) -> dict[str, torch.Tensor]:
    """Every tensor of decoder layer ``index`` keyed as on disk: quantized modules in compressed-tensors
    layout (:func:`quantized_tensors`), the rest as stored (:func:`plain_tensors`)."""
    out = quantized_tensors(layer, index, adapter)
    for k, v in plain_tensors(layer, index, adapter).items():
        out.setdefault(k, v)
    return out


def plain_tensors(layer: nn.Module, index: int, adapter) -> dict[str, torch.Tensor]:
    """The tensors of decoder layer ``index`` outside its quantized modules (norms, routers, 16-bit Linears,
    16-bit experts split per expert, a quantized experts module's biases), keyed as on disk."""
    from ..layout import PerExpertExperts
    from .formats.bnb import _collect

    out: dict[str, torch.Tensor] = {}
    prefix = f"{adapter.layers_path}.{index}."
    quantized = {n for n, m in layer.named_modules() if isinstance(m, (FakeQuantLinear, FakeQuantExperts))}
    state = {k: v for k, v in layer.state_dict(prefix=prefix).items()
             if not any(k.startswith(f"{prefix}{q}.") for q in quantized)}
    fused = {}
    block = adapter.block_of(layer)
    if block is not None and not isinstance(adapter.experts_of(block), (FakeQuantExperts, PerExpertExperts)):
        fused[f"{adapter.block_path(index)}.{adapter.experts}."] = adapter.experts_of(block)
    for k, v in _collect(state, adapter, fused).items():
        out.setdefault(k, v)
    for name, m in layer.named_modules():  # a quantized experts module keeps its biases (GPT-OSS) as plain tensors
        if isinstance(m, FakeQuantExperts) and m.has_bias:
            for e in range(m.num_experts):
                from ..experts import split_gate_up

                bg, bu = split_gate_up(m.gate_up_proj_bias[e], m.is_concatenated)
                for p, b in (("gate_proj", bg), ("up_proj", bu), ("down_proj", m.down_proj_bias[e])):
                    out[f"{_expert_disk(adapter, index, e, p)}.bias"] = b.detach().cpu().contiguous()
    return out


def read_layer(layer: nn.Module, index: int, adapter, assignment: dict[str, Scheme | None],
               tensors: dict[str, torch.Tensor], shared=(), serving: str = "layer") -> None:
    """Swap fake-quantized modules into ``layer`` from stored tensors (``layer`` holds 16-bit or meta
    weights of the right shapes); nothing is re-quantized. ``shared``: the Linear groups a server fuses
    (q/k/v, gate/up: :attr:`~secompress.quant.actstats.LayerStats.shared`, or the adapter's names)."""
    for name, sch in assignment.items():
        if sch is None:
            continue
        if name == adapter.experts:
            block = adapter.block_of(layer)
            old = adapter.experts_of(block)
            held = {}
            for e in range(old.num_experts):
                for p in PROJ:
                    base = _expert_disk(adapter, index, e, p)
                    stored = {k[len(base) + 1:]: v for k, v in tensors.items() if k.startswith(base + ".")}
                    held[(e, p)] = stored_to_held(stored, sch, _expert_shape(old, p), old.down_proj.dtype)
            setattr(block, adapter.experts, FakeQuantExperts.from_held(old, sch, held, serving))
            continue
        base = _linear_name(adapter, index, name)
        stored = {k[len(base) + 1:]: v for k, v in tensors.items() if k.startswith(base + ".")}
        lin = layer.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        held = stored_to_held(stored, sch, (lin.out_features, lin.in_features), lin.weight.dtype)
        new = FakeQuantLinear.from_held(lin, sch, held, stored.get("bias"))
        setattr(layer.get_submodule(parent) if parent else layer, attr, new)
    set_serve_scales(layer, shared)


def _expert_shape(experts, proj: str) -> tuple[int, int]:
    from ..experts import layout_of

    gu = experts.gate_up_proj.shape  # [E, 2I, H] (transposed: [E, H, 2I])
    t = layout_of(experts).transposed
    H, I2 = (gu[1], gu[2]) if t else (gu[2], gu[1])
    return (H, I2 // 2) if proj == "down_proj" else (I2 // 2, H)


# ---- the config -------------------------------------------------------------------------------------
def scheme_config(model, assignments: dict[int, dict[str, Scheme | None]], adapter, sizes=None):
    """compressed-tensors ``QuantizationConfig`` of a model quantized per ``assignments`` (layer index ->
    :func:`~secompress.quant.actquant.layer_assignment`). ``sizes`` (layer -> assignment key -> parameters,
    from the plan) picks the ``Linear`` group; without it the 16-bit or meta modules are counted."""
    require("compressed_tensors", "ct", "the compressed-tensors export")
    from compressed_tensors.quantization import QuantizationConfig

    params: dict[str, int] = {}
    schemes: dict[str, Scheme] = {}
    linears: dict[str, list[str]] = {}
    expert_layers: dict[str, list[int]] = {}
    off_layers = []
    layers = adapter.layers(model)
    for i, asg in assignments.items():
        for name, sch in asg.items():
            if name == adapter.experts:
                if sch is None:
                    off_layers.append(i)
                    continue
                ex = adapter.experts_of(adapter.block_of(layers[i]))
                n = sum(getattr(ex, w).numel() for w in ("gate_up_proj", "down_proj")
                        if getattr(ex, w, None) is not None and not isinstance(ex, FakeQuantExperts))
                expert_layers.setdefault(sch.name, []).append(i)
            elif sch is not None:
                n = layers[i].get_submodule(name).in_features * layers[i].get_submodule(name).out_features
                linears.setdefault(sch.name, []).append(_linear_name(adapter, i, name))
            else:
                continue
            if sizes is not None:
                n = sizes[i][name]
            schemes[sch.name] = sch
            params[sch.name] = params.get(sch.name, 0) + n
    if not schemes:
        raise SecompressError("nothing is quantized: no compressed-tensors config to write")
    main = max(schemes, key=lambda s: (params[s], len(linears.get(s, []))))
    groups = {}
    for s in sorted(schemes, key=lambda s: s == main):  # named groups first, the `Linear` group last
        if s == main:
            targets = ["Linear"]
        else:
            targets = ([_experts_regex(adapter, expert_layers[s])] if s in expert_layers else []) + sorted(linears.get(s, []))
        groups[f"group_{len(groups)}"] = schemes[s].ct_scheme(targets).model_copy(update={"format": schemes[s].format})
    quantized = {f"{adapter.layers_path}.{i}.{n}" for i, a in assignments.items() for n, s in a.items()
                 if s is not None and n != adapter.experts}
    ignore = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, FakeQuantLinear)) and name not in quantized and not _inside_experts(name, adapter):
            ignore.append(disk_key(adapter, name))
    for i in adapter.moe_layer_indices(model):
        for attr in (adapter.router, adapter.shared_expert_gate):
            if attr is not None:
                ignore.append(disk_key(adapter, f"{adapter.block_path(i)}.{attr}"))
    if off_layers:
        ignore.append(_experts_regex(adapter, off_layers))
    formats = {s.format for s in schemes.values()}
    return QuantizationConfig(config_groups=groups, ignore=list(dict.fromkeys(ignore)),
                              format=formats.pop() if len(formats) == 1 else "mixed-precision",
                              quantization_status="compressed")


def _inside_experts(name: str, adapter) -> bool:
    parts = name.split(".")
    return adapter.experts in parts[:-1] if len(parts) > 1 else False
