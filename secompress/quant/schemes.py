"""Quantization schemes by their compressed-tensors preset names (FP8, FP8_DYNAMIC, NVFP4, W8A8, ...).

    s = get_scheme("FP8")            # built from compressed_tensors.quantization.PRESET_SCHEMES
    s.weights, s.inputs              # QArgs of the weight and of the input activation (None: 16-bit)
    s.format                         # the compressor compressed-tensors picks: "float-quantized", ...
    problems = check_shapes(s, shapes)   # [(severity, text)]: group/block sizes, vLLM kernel rules

The registry holds the presets whose math :mod:`secompress.quant.floatq` implements, made from the
library's own preset definitions, so names and arguments match what llm-compressor writes and what
vLLM / SGLang read. :func:`custom_scheme` builds a scheme that is not a preset (e.g. static per-tensor
INT8 activations, for a study) from compressed-tensors ``QuantizationArgs``.

What vLLM serves (``compressed_tensors_moe/*.py``, ``schemes/*.py``, read for this module):
FP8 static per-tensor: one input scale per Linear, and per fused MoE layer the max over its experts'
input scales (``process_fp8_input_tensor_strategy_moe``; w1/w3 weight scales requantized to their max);
FP8_DYNAMIC / FP8_BLOCK / W8A8: activation scales computed per token / per 128-group at run time
(fused INT8 MoE accepts only channel weights + dynamic per-token inputs); NVFP4: one static input
*global* scale per Linear, and for fused MoE one per expert (CUTLASS) or the layer's max (FlashInfer),
group scales dynamic; MXFP4: dynamic E8M0 group scales; W4A16 / W8A16: weights only (Marlin).
Legend: O out features, In in features, H hidden size, I expert FFN width.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..errors import SecompressError, require
from .floatq import QArgs

# presets implemented here -> the compressed-tensors compressor they are written with (derived once from
# the library: see `_format`); aliases the library defines map to the same scheme
SUPPORTED = ("W4A16", "W8A16", "W8A8", "INT8", "W4AFP8", "FP8", "FP8_DYNAMIC", "FP8_BLOCK",
             "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4")
MARLIN_GROUPS = (-1, 32, 64, 128)  # vLLM's MoE Marlin group sizes (check_moe_marlin_supports_layer)


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme: what the weights and the layer inputs become."""

    name: str
    weights: QArgs | None
    inputs: QArgs | None  # None: activations stay 16-bit
    format: str  # compressed-tensors compressor: pack-quantized, float-quantized, int-quantized, nvfp4-..., mxfp4-...
    ct_json: str  # the compressed-tensors QuantizationScheme (targets empty) as JSON, to write configs from
    preset: bool = True

    def __post_init__(self):
        if self.weights is None:
            raise ValueError(f"scheme {self.name}: secompress quantizes weights; a scheme needs weights")
        if self.weights.dynamic:
            raise ValueError(f"scheme {self.name}: dynamic weights are not a thing")

    @property
    def static_inputs(self) -> bool:
        """Input activations with a calibrated scale (FP8 / INT8 static) or global scale (NVFP4)."""
        return self.inputs is not None and self.inputs.static

    @property
    def weight_bits(self) -> int:
        return self.weights.num_bits

    @property
    def weight_only_int(self) -> bool:
        """Integer weights, 16-bit activations (W4A16, W8A16): the integer-code backends (rtn, gptq) make
        these codes themselves, with :attr:`group_size` and symmetric zero points."""
        return self.inputs is None and self.weights.type == "int"

    @property
    def group_size(self) -> int | None:
        """Input features per weight scale (None: per tensor, per row or per block)."""
        return self.weights.group_size

    def ct_scheme(self, targets: list[str]):
        """compressed-tensors ``QuantizationScheme`` with these targets."""
        from compressed_tensors.quantization import QuantizationScheme

        return QuantizationScheme.model_validate({**json.loads(self.ct_json), "targets": targets})

    def describe(self) -> str:
        def one(a: QArgs | None) -> str:
            if a is None:
                return "16-bit"
            kind = f"{a.type}{a.num_bits}"
            size = f" {a.group_size}" if a.group_size else (f" {a.block[0]}x{a.block[1]}" if a.block else "")
            dyn = {False: "static", True: "dynamic", "local": "static global, dynamic local"}[a.dynamic]
            return f"{kind} {a.strategy}{size} ({dyn})"
        return f"{self.name}: weights {one(self.weights)}, inputs {one(self.inputs)}; format {self.format}"


def _qargs(a) -> QArgs | None:
    """compressed-tensors ``QuantizationArgs`` -> :class:`QArgs` (symmetric only)."""
    if a is None:
        return None
    if not a.symmetric:
        raise SecompressError("asymmetric schemes are not supported here (secompress serves symmetric ones)")
    dyn = a.dynamic if isinstance(a.dynamic, bool) else str(getattr(a.dynamic, "value", a.dynamic))
    return QArgs(a.num_bits, str(a.type), str(a.strategy), a.group_size if a.group_size and a.group_size > 0 else None,
                 tuple(a.block_structure) if a.block_structure else None, dyn, a.scale_dtype)


def _format(ct) -> str:
    """The compressor compressed-tensors infers for an nn.Linear with this scheme (``infer_module_format``)."""
    from compressed_tensors.compressors.format import infer_module_format

    return str(infer_module_format(torch.nn.Linear, ct).value)


def _from_ct(name: str, ct, preset: bool) -> Scheme:
    d = json.loads(ct.model_dump_json())
    d.pop("targets", None)
    return Scheme(name, _qargs(ct.weights), _qargs(ct.input_activations), _format(ct), json.dumps(d), preset)


def _build() -> dict[str, Scheme]:
    require("compressed_tensors", "ct", "activation-quantization schemes")
    from compressed_tensors.quantization import preset_name_to_scheme

    reg: dict[str, Scheme] = {}
    for n in SUPPORTED:
        if n in reg:
            raise ValueError(f"scheme {n} registered twice")
        reg[n] = _from_ct(n, preset_name_to_scheme(n, ["Linear"]), True)
    return reg


_REGISTRY: dict[str, Scheme] | None = None


def schemes() -> dict[str, Scheme]:
    """name -> :class:`Scheme`, every supported preset (built from compressed-tensors on first use)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _build()
    return dict(_REGISTRY)


def get_scheme(name: str) -> Scheme:
    """The preset ``name`` (case-insensitive, ``-`` for ``_``: fp8-dynamic), or one line naming the presets."""
    key = str(name).upper().replace("-", "_")
    reg = schemes()
    if key in reg:
        return reg[key]
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    if key in PRESET_SCHEMES:
        raise SecompressError(f"scheme '{name}' is a compressed-tensors preset secompress does not implement; "
                              f"supported: {', '.join(reg)}")
    raise SecompressError(f"unknown scheme '{name}'; supported compressed-tensors presets: {', '.join(reg)}")


def custom_scheme(name: str, weights, input_activations=None) -> Scheme:
    """A scheme that is no preset, from compressed-tensors ``QuantizationArgs`` (or their dicts)."""
    require("compressed_tensors", "ct", "activation-quantization schemes")
    from compressed_tensors.quantization import QuantizationScheme

    if name.upper() in schemes():
        raise SecompressError(f"'{name}' is a preset name; give a custom scheme another name")
    ct = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=input_activations)
    return _from_ct(name, ct, False)


# ---- what a model's shapes allow ------------------------------------------------------------------
def check_shapes(scheme: Scheme, shapes: dict[str, tuple[int, int]], experts: tuple[int, int] | None = None
                 ) -> list[tuple[str, str]]:
    """Problems of ``scheme`` on weights ``shapes`` (name -> (O, In)) and, for fused MoE layers,
    ``experts`` = (H, I). Severity "error": compressed-tensors cannot pack it or vLLM refuses it;
    "note": vLLM falls back to a slower kernel. Rules: group sizes divide In (NVFP4 16, MXFP4 32, int
    128); FP8_BLOCK's 128 x 128 blocks divide In and O (vLLM's validate_fp8_block_shape; MoE: I % 128);
    Marlin (W4A16/W8A16): Linear O % 64, In % 128; MoE H % 128, I % max(64, group), group in (-1, 32, 64, 128)."""
    w, out = scheme.weights, []
    for name, (o, i) in shapes.items():
        if w.group_size and i % w.group_size:
            out.append(("error", f"{name}: group size {w.group_size} does not divide its {i} input features"))
        if w.block and (i % w.block[1] or o % w.block[0]):
            out.append(("error", f"{name}: {w.block[0]}x{w.block[1]} blocks do not tile its [{o}, {i}] weight "
                                 "(vLLM needs whole blocks)"))
        if w.type == "int" and scheme.inputs is None and (o % 64 or i % 128):
            out.append(("note", f"{name}: [{o}, {i}] is not Marlin-aligned (O % 64, In % 128): vLLM uses a slower "
                                "WNA16 kernel"))
    if experts is not None:
        h, i = experts
        for what, n in (("hidden size", h), ("expert width", i)):
            for size in (w.group_size, w.block[1] if w.block else None):
                if size and n % size:
                    out.append(("error", f"experts: {what} {n} is not a multiple of {size}"))
        if w.block and i % w.block[0]:
            out.append(("error", f"experts: expert width {i} is not a multiple of block_n {w.block[0]} (vLLM's "
                                 "fused FP8 MoE needs whole blocks in gate/up)"))
        if w.type == "int" and scheme.inputs is None:
            g = w.group_size or -1
            if g not in MARLIN_GROUPS or h % 128 or i % max(64, g):
                out.append(("note", f"experts: H={h}, I={i}, group {g} do not fit vLLM's MoE Marlin kernel "
                                    "(H % 128, I % max(64, group)): the Triton WNA16 kernel serves them"))
        if w.type == "int" and scheme.inputs is not None and scheme.inputs.static:
            out.append(("error", "experts: vLLM's fused INT8 MoE needs dynamic per-token activations (static "
                                 "INT8 input scales serve Linear layers only)"))
    return out


def check_config(scheme: Scheme, config) -> None:
    """Refuse, before any weight is read, a scheme the checkpoint's own quantization makes meaningless."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method == "fp8" and scheme.weights.type == "float" and scheme.weights.num_bits == 8:
        raise SecompressError(f"scheme {scheme.name}: the checkpoint is FP8 already (quantization_config "
                              "quant_method fp8): vLLM serves it as it is; pick a lower-precision scheme "
                              "(NVFP4, MXFP4, W4A16) or start from the 16-bit checkpoint")


def se_scheme_for(scheme: Scheme, se_bits: int | None) -> Scheme | None:
    """The scheme of a Super-Expert layer protected at ``se_bits`` (None: it stays 16-bit): 8-bit weights
    with activations quantized per token at run time, so no static scale is set by the massive values
    (FP8_DYNAMIC for float schemes, W8A8 for integer ones with quantized inputs, W8A16 weight-only)."""
    if se_bits is None:
        return None
    if scheme.weights.type == "float":
        return get_scheme("FP8_DYNAMIC")
    return get_scheme("W8A8" if scheme.inputs is not None else "W8A16")


def model_shapes(model) -> tuple[dict[str, tuple[int, int]], tuple[int, int] | None]:
    """(quantizable Linear name -> (O, In), (H, I) of the routed experts or None), from any model, a
    meta-device skeleton included (no weight is read)."""
    from .plan import quantizable_units

    adapter_units = quantizable_units(model)
    linears, experts = {}, None
    for name, u in adapter_units.items():
        if u.expert is None:
            w = model.get_submodule(name).weight
            linears[name] = (int(w.shape[0]), int(w.shape[1]))
        elif experts is None:
            experts = (int(u.in_features[0]), int(u.in_features[1]))  # gate/up read H, down reads I
    return linears, experts


def check_model(scheme: Scheme, model) -> list[str]:
    """Refuse, in one line, a scheme the model's shapes cannot serve; returns the notes (slower kernels)."""
    linears, experts = model_shapes(model)
    problems = check_shapes(scheme, linears, experts)
    errors = [t for s, t in problems if s == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SecompressError(f"scheme {scheme.name} cannot be served on this model: {errors[0]}{more}")
    return [t for s, t in problems if s == "note"]
