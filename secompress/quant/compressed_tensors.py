"""The compressed-tensors export (``pack-quantized``) that vLLM, SGLang and transformers load.

    save_ct(model, tokenizer, plan, "out/")    # formats/ct.py: the format's per-layer writer over the model
    model, plan = load_ct("out/")              # secompress.load calls it

On disk (written with compressed-tensors' own ``QuantizationArgs`` / ``QuantizationScheme`` /
``QuantizationConfig`` and its ``pack-quantized`` compressor): every quantized projection under
its checkpoint name (experts per expert: ``model.layers.L.mlp.experts.E.gate_proj.weight_packed``
int32, ``weight_scale`` [O, G] in the export dtype or float32, ``weight_shape``, ``weight_zero_point``
when asymmetric), everything else as plain tensors, and in ``config.json`` a ``quantization_config`` with
``quant_method: compressed-tensors``: one config group per bit-width (the most common one targets
``Linear``; the others, e.g. 8-bit Super-Expert layers, name their layers' experts by regex and
come first), and an ``ignore`` list with ``lm_head``, the routers, every other 16-bit Linear and
the 16-bit Super-Expert layers (one regex per layer, all its experts).

The serving rule (vLLM's compressed-tensors MoE code reads each fused MoE layer's scheme from
expert 0 of that layer, and a layer is served quantized with one scheme or unquantized) makes
``se_mode: layer`` the only Super-Expert protection this format holds: a whole SE layer is in
``ignore`` (16-bit) or in the 8-bit group. ``se_mode: expert`` is refused up front
(:class:`~secompress.quant.formats.ct.CompressedTensorsFormat`). :func:`vllm_rule_problems` checks a written
config against that rule and
:func:`compatibility` derives the transformers / vLLM / SGLang report from it.

Loading: stock transformers 5.24 dequantizes compressed experts into its fused tensors only when
every routed expert is quantized with one scheme (a layer whose experts are all in ``ignore``
fails with "Concatenate on tensors destined for ...gate_up_proj. Ckpt contains: 0": its expert
conversion keeps only ``weight_packed`` tensors). :func:`load_ct` does not go through that
conversion: it builds the model on ``meta``, reads the packed codes with compressed-tensors'
unpacker into secompress's quantized modules (fused experts stay fused) and fills every other
tensor from the files, so every export loads, whatever is in ``ignore``.
Legend: L layer, E expert, O out features, In in features, G groups.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import check_model, load_config
from ..errors import SecompressError, require
from ..layout import PROJ
from ..streaming import Checkpoint, build_skeleton, disk_key, materialise_model
from . import rtn
from .ct_codes import from_signed, to_signed
from .fused import FusedQuantizedExperts
from .plan import QuantPlan

log = logging.getLogger(__name__)
FORMAT = "compressed-tensors"
PACKED = "pack-quantized"
SE_MODE_ERROR = ("export format compressed-tensors needs se_mode: layer (got se_mode: expert): vLLM and SGLang serve "
                 "one quantization scheme per fused MoE layer (vLLM reads it from expert 0), so a 16- or 8-bit Super "
                 "Expert inside a 4-bit layer cannot be served; se_mode: layer keeps the Super Expert's whole layer "
                 "16-bit (in `ignore`) or 8-bit. Or export format: dequantized")


# ---- names ---------------------------------------------------------------------------------
def _expert_disk(adapter, layer: int, e: int | str, proj: str) -> str:
    return disk_key(adapter, f"{adapter.block_path(layer)}.{adapter.experts}.per_expert.{e}.{proj}")


def _experts_regex(adapter, layers) -> str:
    """``re:`` pattern naming every expert projection of ``layers`` (checkpoint and canonical names)."""
    prefixes = [_expert_disk(adapter, l, 0, PROJ[0]).rsplit(".", 2)[0] for l in sorted(layers)]
    names = dict.fromkeys([_expert_disk(adapter, 0, 0, p).rsplit(".", 1)[1] for p in PROJ] + list(PROJ))
    return "re:(" + "|".join(map(re.escape, prefixes)) + r")\.\d+\.(" + "|".join(names) + ")$"


def _unit_modules(plan: QuantPlan, adapter, name: str) -> list[tuple[str, str]]:
    """(key for apply_plan, checkpoint module name) of each weight of plan unit ``name``."""
    u = plan.units[name]
    if u.expert is None:
        return [(name, disk_key(adapter, name))]
    return [(f"{name}.{p}", _expert_disk(adapter, u.layer, u.expert, p)) for p in PROJ]


def layer_bits(plan: QuantPlan) -> dict[int, int | None]:
    """Each MoE layer's one expert bit-width (None: 16-bit); refuses layers that mix widths."""
    out = {}
    for l, names in sorted(plan.moe_layers().items()):
        widths = {plan.bits[n] for n in names}
        if len(widths) > 1:
            shown = sorted("16" if b is None else str(b) for b in widths)
            raise SecompressError(f"MoE layer {l} mixes expert formats ({'/'.join(shown)} bit): the "
                                  f"compressed-tensors export holds one scheme per MoE layer; {SE_MODE_ERROR}")
        out[l] = widths.pop()
    return out


# ---- the quantization config ------------------------------------------------------------------
def _scheme(bits: int, group_size: int | None, symmetric: bool, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if group_size else "channel", group_size=group_size)
    return QuantizationScheme(targets=targets, weights=args, format=PACKED)


def build_config(model, plan: QuantPlan, adapter):
    """compressed-tensors ``QuantizationConfig`` of ``plan`` (see the module docstring)."""
    from compressed_tensors.quantization import QuantizationConfig

    gs = plan.meta.get("group_size")
    gs = None if gs in (None, -1) else gs
    sym = bool(plan.meta.get("symmetric", True))
    lbits = layer_bits(plan)
    weight: dict[int, int] = {}
    for n, b in plan.bits.items():
        if b is not None:
            weight[b] = weight.get(b, 0) + plan.units[n].params
    if not weight:
        raise SecompressError("the plan quantizes nothing: nothing to export in compressed-tensors")
    default = max(weight, key=lambda b: (weight[b], b))
    groups = {}
    for b in sorted(weight):
        if b == default:
            continue
        targets = [_experts_regex(adapter, [l for l, lb in lbits.items() if lb == b])] \
            if b in lbits.values() else []
        targets += sorted(disk_key(adapter, n) for n, nb in plan.bits.items()
                          if nb == b and plan.units[n].expert is None)
        groups[f"group_{len(groups)}"] = _scheme(b, gs, sym, targets)
    # last (compressed-tensors writes the groups sorted by name; its dequantizer takes them in that
    # order and the first match wins): groups naming their modules come before the `Linear` one
    groups[f"group_{len(groups)}"] = _scheme(default, gs, sym, ["Linear"])
    ignore = []
    quantized = {n for n, b in plan.bits.items() if b is not None and plan.units[n].expert is None}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name not in quantized:
            ignore.append(disk_key(adapter, name))  # lm_head, kept Linear units, routers that are Linear
    for l in lbits:
        for attr in (adapter.router, adapter.shared_expert_gate):
            if attr is not None:
                ignore.append(disk_key(adapter, f"{adapter.block_path(l)}.{attr}"))
    off = [l for l, b in lbits.items() if b is None]
    if off:
        ignore.append(_experts_regex(adapter, off))
    return QuantizationConfig(config_groups=groups, ignore=list(dict.fromkeys(ignore)), format=PACKED,
                              quantization_status="compressed")


def scheme_of(qcfg: dict, name: str) -> str | None:
    """The config group serving checkpoint module ``name`` as vLLM resolves it (ignore first, then a
    group naming it exactly or by regex, then a ``Linear`` group); None = unquantized."""
    def hit(target: str) -> bool:
        return re.match(target[3:], name) is not None if target.startswith("re:") else target == name

    if any(hit(t) for t in qcfg.get("ignore") or []):
        return None
    groups = qcfg["config_groups"]
    named = [g for g, s in groups.items() if any(hit(t) for t in s["targets"])]
    if named:
        return named[0]
    return next((g for g, s in groups.items() if "Linear" in s["targets"]), None)


def vllm_rule_problems(qcfg: dict, plan: QuantPlan, adapter) -> list[str]:
    """What vLLM's compressed-tensors MoE loading would reject: each MoE layer's experts share one
    scheme (or are all ignored), and expert 0 of each layer names it; ignored layers are whole."""
    problems = []
    for l, names in sorted(plan.moe_layers().items()):
        experts = sorted(plan.units[n].expert for n in names)
        seen = {(e, p): scheme_of(qcfg, _expert_disk(adapter, l, e, p)) for e in experts for p in PROJ}
        first = {seen[(experts[0], p)] for p in PROJ}
        if len(first) > 1:
            problems.append(f"layer {l}: expert {experts[0]}'s projections have different schemes {sorted(map(str, first))}")
        if len(set(seen.values())) > 1:
            odd = sorted({e for (e, _), s in seen.items() if s != seen[(experts[0], PROJ[0])]})
            problems.append(f"layer {l}: experts {odd} differ from expert {experts[0]}'s scheme "
                            f"{seen[(experts[0], PROJ[0])]} (a layer is served with one scheme; ignored layers "
                            "must be whole)")
        want = plan.bits[names[0]]
        got = seen[(experts[0], PROJ[0])]
        if (want is None) != (got is None) or (got is not None and
                                               qcfg["config_groups"][got]["weights"]["num_bits"] != want):
            problems.append(f"layer {l}: the config serves expert {experts[0]} as {got}, the plan has {want} bits")
    return problems


def compatibility(qcfg: dict, plan: QuantPlan, adapter) -> dict[str, tuple[bool, str]]:
    """runtime -> (loads it, why): the rules of :mod:`secompress.quant.compat` (each checked against a named
    vLLM / SGLang / transformers release) over the written config and the plan."""
    from . import compat

    groups = qcfg["config_groups"].values()
    gs = next((g["weights"].get("group_size") for g in groups), None)
    experts = [u for u in plan.units.values() if u.expert is not None]
    facts = compat.ExportFacts(
        fmt=FORMAT, expert_bits=layer_bits(plan),
        linear_bits=tuple(sorted({b for n, b in plan.bits.items() if b is not None and plan.units[n].expert is None})),
        symmetric=all(g["weights"]["symmetric"] for g in groups), group_size=gs if gs not in (None, -1) else None,
        hidden=experts[0].in_features[0] if experts else None,
        intermediate=experts[0].in_features[-1] if experts else None,
        fused_experts=bool(adapter.ckpt_fused_experts), arch=adapter.model_type,
        problems=tuple(vllm_rule_problems(qcfg, plan, adapter)))
    return {**compat.report(facts), "secompress.load": (True, "real integer codes, experts fused (secompress.load)")}


def report(compat: dict[str, tuple[bool, str]]) -> str:
    return "\n".join(f"{rt:<16}{'yes' if ok else 'no':<5}{why}" for rt, (ok, why) in compat.items())


# ---- save ----------------------------------------------------------------------------------
def iter_qtensors(model, plan: QuantPlan, adapter):
    """(checkpoint module name, its unpacked codes) one weight at a time."""
    from .modules import QuantizedLinear

    for name, b in plan.bits.items():
        if b is None:
            continue
        u = plan.units[name]
        for key, disk in _unit_modules(plan, adapter, name):
            if u.expert is None:
                m = model.get_submodule(name)
                qt = m.qtensor() if isinstance(m, QuantizedLinear) else None
            else:
                qe = adapter.experts_of(adapter.block_of(adapter.layers(model)[u.layer]))
                qt = qe.qtensor(u.expert, key.rsplit(".", 1)[1]) if isinstance(qe, FusedQuantizedExperts) else None
            if qt is None or qt.bits != b:
                raise SecompressError(f"'{key}' is planned at {b} bits but the model does not hold {b}-bit codes "
                                      "for it: save the model quantize_ (or the GPTQ codes) returned this plan for")
            yield disk, qt


def _compress(qts, qc, symmetric: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors' pack-quantized compressor on each weight of ``qts`` ({name: QTensor}, or
    (name, QTensor) pairs taken one at a time); checks the codes come back exactly."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    compressor = BaseCompressor.get_value_from_registry(PACKED)
    qd = qc.model_dump()
    out = {}
    for name, qt in (qts.items() if isinstance(qts, dict) else qts):
        scheme = qc.config_groups[scheme_of(qd, name)]
        want_gs = scheme.weights.group_size or qt.codes.shape[-1]
        if qt.group_size != want_gs:
            raise SecompressError(f"'{name}': group size {qt.group_size} differs from the export's {want_gs}")
        qt = rtn.QTensor(qt.codes.cpu(), qt.scales.cpu(), qt.zeros.cpu(), qt.bits)
        codes, scale, zp = to_signed(qt, symmetric, name)
        sd = {"weight": rtn.dequantize(qt), "weight_scale": scale}  # float32: exactly (q - z) * s
        if zp is not None:
            sd["weight_zero_point"] = zp
        packed = compressor.compress(sd, scheme)
        if not torch.equal(unpack_from_int32(packed["weight_packed"], qt.bits, codes.shape), codes):
            raise SecompressError(f"'{name}': compressed-tensors did not reproduce the integer codes")
        out.update({f"{name}.{k}": v.contiguous() for k, v in packed.items()})
    return out


# ---- load ----------------------------------------------------------------------------------
@torch.no_grad()
def load_ct(path: str | Path, device: str | None = None):
    """Load a :func:`~secompress.quant.formats.ct.save_ct` checkpoint with secompress's quantized modules; returns (model, plan)."""
    require("compressed_tensors", "ct", "loading a compressed-tensors checkpoint")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig

    from .modules import QuantizedLinear, apply_plan
    from .plan import PLAN_NAME

    path = Path(path)
    d = json.loads((path / PLAN_NAME).read_text())
    spec = d.get("export", {})
    if spec.get("format") != FORMAT:
        raise SecompressError(f"'{path}' is not a {FORMAT} export (export format {spec.get('format')!r})")
    plan = QuantPlan.from_json(d)
    qc = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    qd = qc.model_dump()
    dtype = getattr(torch, spec["dtype"])
    config = load_config(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is the plain model; secompress swaps the modules in
    model = build_skeleton(config)
    adapter = check_model(model)
    disk = {key: name for n, b in plan.bits.items() if b is not None for key, name in _unit_modules(plan, adapter, n)}
    ckpt = Checkpoint(path, raw=True)  # reads its own codes

    def make(key: str, w: torch.Tensor, bits: int) -> rtn.QTensor:
        name = disk[key]
        group = scheme_of(qd, name)
        if group is None or f"{name}.weight_packed" not in ckpt:
            raise SecompressError(f"'{path}' has no packed weight for '{name}' ({bits}-bit in the plan)")
        args = qc.config_groups[group].weights
        if args.num_bits != bits:
            raise SecompressError(f"'{name}': stored {args.num_bits}-bit, the plan says {bits}")
        shape = tuple(int(x) for x in ckpt.get(f"{name}.weight_shape").tolist())
        if shape != tuple(w.shape):
            raise SecompressError(f"'{name}': stored shape {shape} != model weight {tuple(w.shape)}")
        scale = ckpt.get(f"{name}.weight_scale")
        codes = unpack_from_int32(ckpt.get(f"{name}.weight_packed"), bits, torch.Size(shape))
        zp = None
        if not args.symmetric:
            zp = unpack_from_int32(ckpt.get(f"{name}.weight_zero_point"), bits, scale.shape, packed_dim=0)
        return from_signed(codes, scale, zp, bits, name)

    with ckpt.reading():
        apply_plan(model, plan, make)
    for m in model.modules():  # the skeleton was built in float32; compute in the stored dtype
        if isinstance(m, (QuantizedLinear, FusedQuantizedExperts)):
            m.weight_dtype = dtype
    materialise_model(model, ckpt, adapter, dtype)  # everything else, as stored
    model.config.dtype = dtype
    if device is not None:
        model.to(device)
    return model.eval(), plan
