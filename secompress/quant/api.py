"""The quantization stage: ``quantize_(model, QuantConfig(...))`` and export.

    plan = quantize_(model, QuantConfig(bits=4, group_size=32, se_bits=None), profile=prof)
    save_quantized(model, tokenizer, plan, "out/")       # stock transformers loads "out/"
    model = load_quantized("out/")                         # the real quantized modules again

``quantize_`` resolves a :class:`~secompress.quant.plan.QuantPlan` (rules, default bits,
Super-Expert protection, optionally a bit allocation for an average bit-width) and then
replaces each planned weight by integer codes: a Linear by a :class:`QuantizedLinear`, a
layer's fused experts by a :class:`~secompress.quant.fused.FusedQuantizedExperts` (stacked
codes, one dequantize per layer and forward). Units planned None are kept
bit-identical; a MoE layer whose experts are all None keeps its fused module untouched.
Legend: E experts, O out features, In in features, G groups per row.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import MissingExtraError, SecompressError, require
from ..checkpoints import check_model, write_legacy_config_keys
from ..outputs import atomic_dir
from ..experts import expert_weights
from ..layout import PROJ, PerExpertExperts
from . import rtn
from .fused import FusedQuantizedExperts
from .allocate import allocate
from .coverage import FALLBACKS, check_coverage
from .plan import SE_MODES, QuantPlan, Rule, check_bits, resolve_plan

log = logging.getLogger(__name__)
PLAN_NAME = "quantization_plan.json"
CODES_NAME = "secompress_quant.safetensors"
METHODS = {"rtn": None, "gptq": ("gptqmodel", "gptq"), "bnb": ("bitsandbytes", "bnb")}  # name -> (package, extra)
IMPLEMENTED = {"rtn", "bnb", "gptq"}  # gptq: from a checkpoint path, see quant/gptq.py


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4  # default bits of every quantizable weight
    group_size: int | None = 128  # input features per scale; None = one group per row
    symmetric: bool = False
    se_mode: str = "expert"  # "expert": only SEs raised; "layer": every expert of an SE's layer
    se_bits: int | None = None  # Super Experts' bits: 8, or None = keep 16-bit
    protect_super_experts: bool = True
    rules: tuple[Rule, ...] = ()  # exact names beat regexes beat `bits`
    avg_bits: float | None = None  # target parameter-weighted average over routed experts -> allocation
    candidate_bits: tuple[int, ...] = (2, 3, 4, 8, 16)  # allocation choices (16 = keep)
    method: str = "rtn"  # rtn | bnb in place; gptq from a checkpoint (quant/gptq.py)
    bnb_quant_type: str = "nf4"  # method "bnb", 4-bit: nf4 | fp4
    fallback: str | None = None  # for experts without calibration tokens: None = error, "rtn"

    def __post_init__(self):
        check_bits(self.bits)
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
        if self.se_mode not in SE_MODES:
            raise ValueError(f"se_mode must be one of {SE_MODES}, got '{self.se_mode}'")
        if self.se_bits not in (8, None):
            raise ValueError(f"se_bits must be 8 or None (16-bit), got {self.se_bits!r}")
        if not all(isinstance(r, Rule) for r in self.rules):
            raise ValueError("rules must be Rule objects (Rule.parse('NAME=BITS') builds one)")
        for b in self.candidate_bits:
            if b != 16:
                check_bits(b, "candidate bits")
        if self.avg_bits is not None and not (isinstance(self.avg_bits, (int, float)) and self.avg_bits > 0):
            raise ValueError(f"avg_bits must be a positive number, got {self.avg_bits!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}'; known: {', '.join(METHODS)}")
        if self.bnb_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_quant_type must be 'nf4' or 'fp4', got {self.bnb_quant_type!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")


def _installed(package: str) -> bool:
    import importlib.util
    import sys

    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def check_method(method: str) -> None:
    """RTN runs here; bnb needs its extra; gptq is not wired up yet."""
    if METHODS.get(method) is None:
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}'; known: {', '.join(METHODS)}")
        return
    package, extra = METHODS[method]
    if method == "gptq":  # never imported here: gptqmodel patches transformers on import (see quant/gptq.py)
        if not _installed(package):
            raise MissingExtraError(package, extra, f"quantization method '{method}'")
    else:
        require(package, extra, f"quantization method '{method}'")
    if method in IMPLEMENTED:
        return
    raise NotImplementedError(f"method '{method}': {package} is installed but secompress does not drive it yet; "
                              "use method='rtn'")


# ---- modules -------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """A Linear holding uint8 codes [O, In], float16 scales and uint8 zeros [O, G]; it
    dequantizes to the original dtype on each forward."""

    def __init__(self, qt: rtn.QTensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = qt.codes.shape
        self.bits, self.weight_dtype = qt.bits, dtype
        self.register_buffer("codes", qt.codes)
        self.register_buffer("scales", qt.scales)
        self.register_buffer("zeros", qt.zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, qt: rtn.QTensor) -> "QuantizedLinear":
        return cls(qt, lin.bias, lin.weight.dtype)

    def qtensor(self) -> rtn.QTensor:
        return rtn.QTensor(self.codes, self.scales, self.zeros, self.bits)

    @property
    def weight(self) -> torch.Tensor:  # [O, In] dequantized (what the export writes)
        return rtn.dequantize(self.qtensor(), self.weight_dtype)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.in_features // self.scales.shape[-1]}"


QuantizedExperts = FusedQuantizedExperts  # a layer's quantized experts: stacked codes, kept fused (quant/fused.py)


# ---- quantize_ -----------------------------------------------------------------------------
def _profile_for(model, profile, tokenizer, data, adapter):
    if profile is not None:
        E, L = adapter.num_experts(model.config), len(adapter.layers(model))
        if profile.model_type != model.config.model_type or profile.num_experts != E or profile.num_layers != L:
            raise SecompressError(f"the profile is of a {profile.model_type} model with {profile.num_layers} layers "
                                  f"x {profile.num_experts} experts, this model is {model.config.model_type} "
                                  f"with {L} x {E}")
        return profile
    if tokenizer is None:
        raise SecompressError("SE-aware quantization and bit allocation need a profile: pass profile= "
                              "(secompress.load_profile) or tokenizer= to profile now")
    from ..profile import ProfileConfig, profile as run_profile

    return run_profile(model, tokenizer, data=data, config=ProfileConfig(num_samples=16, seq_len=256, batch_size=4),
                       progress=False)


def plan_quantization(model, config: QuantConfig, profile=None, tokenizer=None, data="builtin") -> QuantPlan:
    """The plan ``quantize_`` would apply, validated against the model (nothing is changed)."""
    check_method(config.method)
    adapter = check_model(model)
    need_profile = config.protect_super_experts or config.avg_bits is not None
    prof = _profile_for(model, profile, tokenizer, data, adapter) if need_profile else None
    ses = prof.se_ids() if (prof is not None and config.protect_super_experts) else []
    meta = {"method": config.method, "group_size": config.group_size, "symmetric": config.symmetric,
            "protect_super_experts": config.protect_super_experts}
    plan = resolve_plan(model, config.rules, ses, config.se_mode, config.se_bits, config.bits, meta)
    if config.avg_bits is not None:
        plan = _allocate(plan, prof, config)
    for name, b in plan.bits.items():
        if b is not None and config.method != "bnb":  # bitsandbytes has its own fixed blocks
            for n_in in plan.units[name].in_features:
                rtn.check_args(b, config.group_size, n_in, f"'{name}' (set its bits with a rule, or pick another "
                                                            "group_size)")
    return plan


def _allocate(plan: QuantPlan, prof, config: QuantConfig) -> QuantPlan:
    """Routed experts' bits from :func:`~secompress.quant.allocate.allocate`; importance = routed-token share.

    Pinned: SE-protected experts (at their protected bits), rule-matched experts, and (with
    fallback 'rtn') uncalibrated experts at ``config.bits``. se_mode 'layer' allocates per layer.
    """
    missing = set(check_coverage(prof, config.fallback))
    tokens = prof.arrays["tokens"]  # [L, E + 1]
    experts = [u for u in plan.units.values() if u.expert is not None]
    per_layer = config.se_mode == "layer"
    groups: dict = {}
    for u in experts:
        groups.setdefault(u.layer if per_layer else u.name, []).append(u)
    keys = list(groups)
    imp = [float(sum(max(0, tokens[u.layer, u.expert]) for u in groups[k])) for k in keys]
    par = [sum(u.params for u in groups[k]) for k in keys]
    bits, source = dict(plan.bits), dict(plan.source)
    pinned, cand = {}, sorted(set(config.candidate_bits) | ({16} if config.se_bits is None else {8}))
    for i, k in enumerate(keys):
        us = groups[k]
        fixed = [u for u in us if source[u.name] in ("se", "exact", "regex")]
        if fixed:
            pinned[i] = max(bits[u.name] or 16 for u in fixed)
        elif any((u.layer, u.expert) in missing for u in us):
            pinned[i] = config.bits
            for u in us:
                source[u.name] = "fallback"
    res = allocate(imp, par, cand, config.avg_bits, pinned)
    for i, k in enumerate(keys):
        for u in groups[k]:
            bits[u.name] = None if res.bits[i] == 16 else res.bits[i]
            if i not in pinned:
                source[u.name] = "alloc"
    meta = {**plan.meta, "allocation": {**res.to_json(), "granularity": "layer" if per_layer else "expert",
                                        "candidates": cand, "uncalibrated": sorted(map(list, missing))}}
    log.info("allocation: average %.3f bits over routed experts (target %.3f)", res.average, res.target)
    return QuantPlan(bits, plan.units, source, plan.super_experts, plan.se_mode, plan.se_bits, meta)


def quantize_(model, config: QuantConfig, profile=None, tokenizer=None, data="builtin") -> QuantPlan:
    """Quantize ``model`` in place following ``config``; returns the plan applied.

    The Super Experts come from ``profile`` (a :class:`~secompress.profile.ProfileResult`), or
    from profiling ``data`` with ``tokenizer`` now. Every check runs before any weight changes.
    """
    check_method(config.method)  # a missing extra is named first
    if config.method == "gptq":
        raise SecompressError("GPTQ runs on a checkpoint, not in place: use `secompress quantize MODEL --method gptq` "
                              "or secompress.quant.gptq.gptq_quantize(path, tokenizer, plan, calib_ids, out)")
    plan = plan_quantization(model, config, profile, tokenizer, data)
    if config.method == "bnb":
        from .bnb import apply_bnb

        apply_bnb(model, plan, config.bnb_quant_type)
        return plan
    gs, sym = config.group_size, config.symmetric
    apply_plan(model, plan, lambda key, w, bits: rtn.quantize(w, bits, gs, sym))
    return plan


def planned_linears(model, plan: QuantPlan):
    """(unit name, parent module, attribute, nn.Linear, bits) of every planned unit that is not a routed expert."""
    for name, b in plan.bits.items():
        if b is None or plan.units[name].expert is not None:
            continue
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise SecompressError(f"'{name}' is a {type(lin).__name__}, not an nn.Linear: already quantized?")
        parent, _, attr = name.rpartition(".")
        yield name, model.get_submodule(parent), attr, lin, b


def planned_expert_layers(model, plan: QuantPlan, adapter):
    """(MoE block, its fused experts, {expert: (unit name, bits)}) of every layer with planned experts."""
    for layer, names in plan.moe_layers().items():
        todo = {plan.units[n].expert: (n, plan.bits[n]) for n in names if plan.bits[n] is not None}
        if not todo:
            continue
        block = adapter.block_of(adapter.layers(model)[layer])
        experts = adapter.experts_of(block)
        if isinstance(experts, (PerExpertExperts, FusedQuantizedExperts)):
            raise SecompressError(f"layer {layer}: experts are already per-expert/quantized; quantize a fused model")
        yield block, experts, todo


@torch.no_grad()
def apply_plan(model, plan: QuantPlan, make) -> None:
    """Replace each planned unit with its quantized module; ``make(key, weight [O, In], bits) -> QTensor``.

    Keys: a Linear's module name; an expert's projection ``<expert name>.<gate_proj|up_proj|down_proj>``.
    """
    adapter = check_model(model)
    for name, parent, attr, lin, b in list(planned_linears(model, plan)):
        setattr(parent, attr, QuantizedLinear.from_linear(lin, make(name, lin.weight, b)))
    for block, experts, todo in list(planned_expert_layers(model, plan, adapter)):
        quantized = {e: {p: make(f"{n}.{p}", w, bits) for p, w in expert_weights(experts, e).items() if p in PROJ}
                     for e, (n, bits) in todo.items()}
        setattr(block, adapter.experts, FusedQuantizedExperts(experts, quantized))


# ---- export --------------------------------------------------------------------------------
@contextmanager
def dequantized(model):
    """Inside the block the model has plain Linear / fused modules with the dequantized weights."""
    adapter = check_model(model)
    swaps = []  # (parent, attr, quantized module, plain module)
    inside = set()
    for i in adapter.moe_layer_indices(model):
        block = adapter.block_of(adapter.layers(model)[i])
        qe = adapter.experts_of(block)
        if isinstance(qe, QuantizedExperts):
            inside |= {id(m) for m in qe.modules()}
            swaps.append((block, adapter.experts, qe, qe.to_fused()))
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantizedLinear) and id(mod) not in inside:
            parent, _, attr = name.rpartition(".")
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            lin.weight = nn.Parameter(mod.weight, requires_grad=False)
            if mod.bias is not None:
                lin.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
            swaps.append((model.get_submodule(parent), attr, mod, lin))
    try:
        for parent, attr, _, plain in swaps:
            setattr(parent, attr, plain)
        yield model
    finally:
        for parent, attr, q, _ in swaps:
            setattr(parent, attr, q)
            if isinstance(q, QuantizedExperts):
                q.release_fused()


def quantized_tensors(model, plan: QuantPlan) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Packed codes, scales and zeros of every quantized weight, and {key: [shape, bits]}."""
    adapter = check_model(model)
    mods: dict[str, QuantizedLinear] = {}
    for name, b in plan.bits.items():
        u = plan.units[name]
        if b is None:
            continue
        if u.expert is None:
            m = model.get_submodule(name)
            mods[name] = m.qtensor() if isinstance(m, QuantizedLinear) else None
        else:
            qe = adapter.experts_of(adapter.block_of(adapter.layers(model)[u.layer]))
            for p in PROJ:
                mods[f"{name}.{p}"] = qe.qtensor(u.expert, p) if isinstance(qe, FusedQuantizedExperts) else None
    tensors, shapes = {}, {}
    for key, qt in mods.items():
        if qt is None:
            raise SecompressError(f"'{key}' is planned quantized but is not: save the model quantize_ returned "
                                  "this plan for")
        tensors[f"{key}.qweight"] = rtn.pack(qt.codes.cpu(), qt.bits)
        tensors[f"{key}.scales"] = qt.scales.cpu().contiguous()
        tensors[f"{key}.zeros"] = rtn.pack(qt.zeros.cpu(), qt.bits)
        shapes[key] = [list(qt.codes.shape), list(qt.scales.shape), qt.bits]
    return tensors, shapes


def save_quantized(model, tokenizer, plan: QuantPlan, out: str | Path, overwrite: bool = False) -> Path:
    """Write atomically to ``out``, with ``quantization_plan.json``.

    RTN: the dequantized checkpoint in the original dtype and layout (stock ``from_pretrained``
    loads it) and the packed codes in ``secompress_quant.safetensors`` (for :func:`load_quantized`).
    bitsandbytes (``plan.meta['method'] == 'bnb'``): the bitsandbytes serialisation in the
    per-expert layout, see :mod:`secompress.quant.bnb_export`.
    """
    if plan.meta.get("method") == "bnb":
        from .bnb_export import save_bnb

        return save_bnb(model, tokenizer, plan, out, overwrite)
    if any(isinstance(m, PerExpertExperts) for m in model.modules()):
        raise SecompressError("the model has per-expert modules that are not RTN-quantized: save the model that "
                              "quantize_ returned this plan for")
    from safetensors.torch import save_file

    adapter = check_model(model)
    tensors, shapes = quantized_tensors(model, plan)  # fails before anything is written
    with atomic_dir(out, overwrite) as tmp:
        with dequantized(model):
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_legacy_config_keys(tmp / "config.json", model.config, adapter)
        (tmp / PLAN_NAME).write_text(json.dumps(plan.to_json(), indent=2) + "\n")
        save_file(tensors, str(tmp / CODES_NAME), metadata={"format": "secompress-rtn", "version": "1",
                                                            "shapes": json.dumps(shapes)})
    return Path(out)


def load_quantized(path: str | Path, device: str | None = None):
    """Load a :func:`save_quantized` checkpoint with its real quantized modules; returns (model, plan)."""
    from safetensors import safe_open

    from ..checkpoints import load_model

    path = Path(path)
    if not (path / PLAN_NAME).is_file() or not (path / CODES_NAME).is_file():
        raise SecompressError(f"'{path}' lacks {PLAN_NAME} or {CODES_NAME}: not a secompress quantized checkpoint")
    plan = QuantPlan.from_json(json.loads((path / PLAN_NAME).read_text()))
    model = load_model(path, dtype="auto", device=device)
    with safe_open(str(path / CODES_NAME), framework="pt") as f:
        shapes = json.loads(f.metadata()["shapes"])

        def make(key, w, bits):
            if key not in shapes:
                raise SecompressError(f"{CODES_NAME} has no codes for '{key}'")
            cshape, sshape, b = shapes[key]
            if b != bits or list(w.shape) != cshape:
                raise SecompressError(f"'{key}': stored {b}-bit {cshape} codes do not match the plan/model "
                                      f"({bits}-bit {list(w.shape)})")
            qt = rtn.QTensor(rtn.unpack(f.get_tensor(f"{key}.qweight"), b, tuple(cshape)),
                             f.get_tensor(f"{key}.scales"),
                             rtn.unpack(f.get_tensor(f"{key}.zeros"), b, tuple(sshape)), b)
            return rtn.QTensor(*(t.to(w.device) for t in (qt.codes, qt.scales, qt.zeros)), b)

        apply_plan(model, plan, make)
    return model, plan


def quantized_bytes(model) -> int:
    """Bytes of the model as held in memory after ``quantize_``, with codes counted at their bit-width."""
    total, inside = 0, set()
    for m in model.modules():
        if isinstance(m, FusedQuantizedExperts):
            total += m.nbytes_quantized()
            inside |= {id(t) for t in list(m.buffers(recurse=False)) + list(m.parameters(recurse=False))}
        if isinstance(m, QuantizedLinear):
            total += (m.codes.numel() * m.bits + 7) // 8 + m.scales.numel() * 2 + (m.zeros.numel() * m.bits + 7) // 8
            total += 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
            inside |= {id(t) for t in (m.codes, m.scales, m.zeros, m.bias) if t is not None}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in inside and t.device.type != "meta":
            total += t.numel() * t.element_size()
    return total
