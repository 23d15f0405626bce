"""The precision plan: one explicit bit-width (or None = keep 16-bit) per quantizable weight.

Units of a plan:
  - every ``nn.Linear`` inside a decoder layer (attention, shared expert, dense MLP), by its
    module name, e.g. ``model.layers.0.self_attn.q_proj``; routers and the shared-expert
    gate are never quantized;
  - every routed expert, addressed ``<layers path>.<i>.<block>.experts.<e>`` (e.g.
    ``model.layers.0.mlp.experts.5``); its gate, up and down projections share its bits.

:func:`resolve_plan` applies ordered :class:`Rule` s (an exact module name beats any regex,
the first matching regex beats the default), then protects the Super Experts (Su et al.
2025, arXiv 2507.23279): ``se_mode="expert"`` raises only the SEs to ``se_bits``;
``se_mode="layer"`` raises every expert of a layer holding an SE (fused-MoE kernels such
as vLLM's take one format per layer). A shared-expert SE raises the shared expert's
Linear layers. Protection never lowers precision that a rule already gave.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from torch import nn

from ..checkpoints import check_model
from ..experts import layout_of
from ..layout import PerExpertExperts
from .rtn import BITS

PLAN_VERSION = 1
PLAN_NAME = "quantization_plan.json"  # written next to every quantized export
SE_MODES = ("expert", "layer")
RUNTIMES = ("transformers", "gptqmodel", "vllm-fused-moe")


def check_bits(bits, what: str = "bits") -> None:
    if bits is not None and (isinstance(bits, bool) or bits not in BITS):
        raise ValueError(f"{what} must be one of {BITS} or None (keep 16-bit), got {bits!r}")


def more_precise(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(a, b)


def bits_label(b: int | None) -> str:
    return "16" if b is None else str(b)


@dataclass(frozen=True)
class Rule:
    """``pattern`` is an exact unit name, or (``regex=True``) a regex that must match a whole name."""

    pattern: str
    bits: int | None
    regex: bool = False

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError("a rule needs a non-empty pattern")
        check_bits(self.bits, f"the bits of rule '{self.pattern}'")
        if self.regex:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"rule regex '{self.pattern}' does not compile: {e}") from None

    @classmethod
    def parse(cls, text: str) -> "Rule":
        """``NAME=BITS`` or ``re:REGEX=BITS``; BITS 16 or none keeps the weight 16-bit."""
        pat, sep, b = text.rpartition("=")
        if not sep or not pat:
            raise ValueError(f"a rule is NAME=BITS or re:REGEX=BITS, got '{text}'")
        bits = None if b.lower() in ("16", "none") else int(b)
        return cls(pat[3:], bits, True) if pat.startswith("re:") else cls(pat, bits)


@dataclass(frozen=True)
class Unit:
    """One quantizable unit: a Linear (``expert`` None) or a routed expert."""

    name: str
    layer: int
    params: int
    in_features: tuple[int, ...]  # of each weight (an expert: gate/up, down)
    expert: int | None = None  # routed-expert id
    shared: bool = False  # part of the layer's shared expert


def quantizable_units(model) -> dict[str, Unit]:
    """Every quantizable unit of an MoE model, in module order."""
    adapter = check_model(model)
    units: dict[str, Unit] = {}
    for i, layer in enumerate(adapter.layers(model)):
        prefix = f"{adapter.layers_path}.{i}"
        block = adapter.block_of(layer)
        skip, shared_ids = set(), set()
        if block is not None:
            experts = adapter.experts_of(block)
            skip_roots = [experts, adapter.router_of(block)]
            if adapter.shared_expert_gate:
                skip_roots.append(getattr(block, adapter.shared_expert_gate))
            skip = {id(m) for root in skip_roots for m in root.modules()}
            shared = adapter.shared_of(block)
            shared_ids = {id(m) for m in shared.modules()} if shared is not None else set()
        for sub, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and id(mod) not in skip:
                units[f"{prefix}.{sub}"] = Unit(f"{prefix}.{sub}", i, mod.weight.numel(), (mod.in_features,),
                                                shared=id(mod) in shared_ids)
        if block is None:
            continue
        base = f"{adapter.block_path(i)}.{adapter.experts}"
        for e, (params, ins) in enumerate(_expert_shapes(experts)):
            units[f"{base}.{e}"] = Unit(f"{base}.{e}", i, params, ins, expert=e)
    return units


def _expert_shapes(experts: nn.Module) -> list[tuple[int, tuple[int, int]]]:
    """(parameter count, (in features of gate/up, of down)) per expert, weights only."""
    if isinstance(experts, PerExpertExperts):
        out = []
        for m in experts.per_expert:
            lins = (m.gate_proj, m.up_proj, m.down_proj)
            out.append((sum(l.in_features * l.out_features for l in lins), (m.gate_proj.in_features,
                                                                              m.down_proj.in_features)))
        return out
    gu, dn = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I] (transposed: [E, H, 2I], [E, I, H])
    t = layout_of(experts).transposed
    ins = (gu.shape[1], dn.shape[1]) if t else (gu.shape[2], dn.shape[2])
    return [(gu[0].numel() + dn[0].numel(), ins)] * experts.num_experts


@dataclass
class QuantPlan:
    bits: dict[str, int | None]  # unit name -> bits, None = keep 16-bit
    units: dict[str, Unit]
    source: dict[str, str]  # unit name -> exact | regex | default | se | alloc | fallback
    super_experts: list[tuple[int, int | str]] = field(default_factory=list)
    se_mode: str = "expert"
    se_bits: int | None = None
    meta: dict = field(default_factory=dict)  # method, group_size, symmetric, allocation report
    artifacts: dict = field(default_factory=dict, repr=False, compare=False)  # backend outputs, not saved

    def __post_init__(self):
        if set(self.bits) != set(self.units):
            raise ValueError("a plan needs bits for exactly its units")
        for n, b in self.bits.items():
            check_bits(b, f"the bits of '{n}'")

    def avg_bits(self, experts_only: bool = False) -> float:
        """Parameter-weighted average bit-width (16 for kept weights)."""
        us = [u for u in self.units.values() if u.expert is not None or not experts_only]
        total = sum(u.params for u in us)
        return sum(u.params * (self.bits[u.name] or 16) for u in us) / max(1, total)

    def layer(self, index: int) -> "QuantPlan":
        """The part of the plan for decoder layer ``index`` (the streamed engine applies it layer by layer)."""
        names = [n for n, u in self.units.items() if u.layer == index]
        return QuantPlan({n: self.bits[n] for n in names}, {n: self.units[n] for n in names},
                         {n: self.source[n] for n in names}, self.super_experts, self.se_mode, self.se_bits, self.meta)

    def moe_layers(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for u in self.units.values():
            if u.expert is not None:
                out.setdefault(u.layer, []).append(u.name)
        return out

    def compatibility(self) -> dict[str, tuple[bool, str]]:
        """Which runtimes can load the export of this plan: runtime -> (ok, why), as its export format (else
        its method) reported it when the plan was made or its export written ({} when nobody said)."""
        return {k: (bool(v[0]), str(v[1])) for k, v in self.artifacts.get("compatibility", {}).items()}

    def table(self, with_compatibility: bool = True) -> str:
        """One row per decoder layer: bits of the non-expert weights, histogram of expert bits, SEs,
        and the runtimes that load its export (a compressed-tensors export knows them once written)."""
        ses: dict[int, list] = {}
        for l, e in self.super_experts:
            ses.setdefault(l, []).append(e)
        layers = sorted({u.layer for u in self.units.values()})
        rows = [f"{'layer':>5}  {'attention/dense/shared':<24}{'routed experts (bits x count)':<32}SEs"]
        for l in layers:
            lin = Counter(bits_label(self.bits[u.name]) for u in self.units.values()
                          if u.layer == l and u.expert is None)
            exp = Counter(bits_label(self.bits[u.name]) for u in self.units.values()
                          if u.layer == l and u.expert is not None)
            fmt = lambda c: " ".join(f"{b}b x{n}" for b, n in sorted(c.items(), key=lambda kv: int(kv[0])))
            rows.append(f"{l:>5}  {fmt(lin):<24}{fmt(exp):<32}{ses.get(l, '')}")
        rows.append(f"average bits {self.avg_bits():.3f} (routed experts {self.avg_bits(True):.3f}); "
                    f"SE mode {self.se_mode}, SE bits {bits_label(self.se_bits)}")
        for rt, (ok, why) in (self.compatibility() if with_compatibility else {}).items():
            rows.append(f"{rt:<16}{'yes' if ok else 'no':<5}{why}")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {"plan_version": PLAN_VERSION, "se_mode": self.se_mode, "se_bits": self.se_bits,
                "super_experts": [{"layer": l, "expert": e} for l, e in self.super_experts],
                "average_bits": self.avg_bits(), "average_bits_experts": self.avg_bits(True),
                "compatibility": {k: {"ok": ok, "why": why} for k, (ok, why) in self.compatibility().items()},
                "meta": self.meta,
                "modules": [{**asdict(u), "bits": self.bits[n], "source": self.source[n]}
                            for n, u in self.units.items()]}

    @classmethod
    def from_json(cls, d: dict) -> "QuantPlan":
        if d.get("plan_version") != PLAN_VERSION:
            raise ValueError(f"unsupported plan_version {d.get('plan_version')} (expected {PLAN_VERSION})")
        units, bits, source = {}, {}, {}
        for m in d["modules"]:
            u = Unit(m["name"], m["layer"], m["params"], tuple(m["in_features"]), m["expert"], m["shared"])
            units[u.name], bits[u.name], source[u.name] = u, m["bits"], m["source"]
        plan = cls(bits, units, source, [(s["layer"], s["expert"]) for s in d["super_experts"]],
                   d["se_mode"], d["se_bits"], d.get("meta", {}))
        report = d.get("compatibility") or d.get("export", {}).get("compatibility", {})
        plan.artifacts["compatibility"] = {k: (v["ok"], v["why"]) for k, v in report.items()}
        return plan


def _match(name: str, exact: dict[str, Rule], regexes: list[Rule]) -> Rule | None:
    if name in exact:
        return exact[name]
    return next((r for r in regexes if re.fullmatch(r.pattern, name)), None)


def se_targets(units: dict[str, Unit], ses, se_mode: str) -> set[str]:
    """The unit names that Super-Expert protection raises."""
    if se_mode not in SE_MODES:
        raise ValueError(f"se_mode must be one of {SE_MODES}, got '{se_mode}'")
    by_layer: dict[int, dict[int, str]] = {}
    for u in units.values():
        if u.expert is not None:
            by_layer.setdefault(u.layer, {})[u.expert] = u.name
    out = set()
    for l, e in ses:
        if e is None:  # "an SE of layer l" whose id is decided later (merging): only its layer can be raised
            if se_mode != "layer":
                raise ValueError(f"a Super Expert of layer {l} is renumbered during the pass (merging): only "
                                 "se_mode 'layer' can protect it in the same pass; prune first, then quantize")
            out |= set(by_layer.get(l, {}).values())
        elif e == "shared":
            found = {u.name for u in units.values() if u.layer == l and u.shared}
            if not found:
                raise ValueError(f"Super Expert ({l}, 'shared'): layer {l} has no shared expert")
            out |= found
        elif e not in by_layer.get(l, {}):
            raise ValueError(f"Super Expert ({l}, {e}) is not a routed expert of this model")
        else:
            out |= set(by_layer[l].values()) if se_mode == "layer" else {by_layer[l][e]}
    return out


def resolve_plan(model, rules=(), ses=(), se_mode: str = "expert", se_bits: int | None = None,
                 default: int | None = 4, meta: dict | None = None) -> QuantPlan:
    """The explicit per-unit plan of ``model``: rules, then default, then Super-Expert protection."""
    check_bits(default, "default bits")
    if se_bits not in (8, None):
        raise ValueError(f"se_bits must be 8 or None (keep 16-bit), got {se_bits!r}")
    units = quantizable_units(model)
    exact: dict[str, Rule] = {}
    for r in rules:
        if not r.regex:
            if r.pattern in exact:
                raise ValueError(f"two exact rules for '{r.pattern}'")
            if r.pattern not in units:
                raise ValueError(f"rule '{r.pattern}' names no quantizable weight (exact names like "
                                 f"'{next(iter(units))}'; use regex=True for patterns)")
            exact[r.pattern] = r
    regexes = [r for r in rules if r.regex]
    bits, source = {}, {}
    for name in units:
        r = _match(name, exact, regexes)
        bits[name], source[name] = (default, "default") if r is None else (r.bits, "regex" if r.regex else "exact")
    ses = [(int(l), e if e in ("shared", None) else int(e)) for l, e in ses]
    for name in se_targets(units, ses, se_mode):
        bits[name], source[name] = more_precise(bits[name], se_bits), "se"
    return QuantPlan(bits, units, source, ses, se_mode, se_bits, dict(meta or {}))
