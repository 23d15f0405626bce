"""The prune report: :class:`PruneResult` (what was removed, merged or narrowed, sizes, perplexity),
its builders for removal and restructuring (the same for resident and streamed passes), the
profile renumbered for the pruned model, and the console table.
Legend: L decoder layers, E routed experts before, E2 after.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import numpy as np

from ..checkpoints import check_model
from .select import ProtectionChange, protected_by_layer
from .structural import SizeDelta, model_size

REPORT_NAME = "prune_report.json"
REPORT_VERSION = 1


@dataclass
class PruneResult(SizeDelta):
    config: object  # PruneConfig
    model: str
    model_type: str
    num_experts_before: int
    num_experts_after: int
    moe_layers: list[int]
    kept: dict[int, list[int]]  # layer -> original ids of the kept experts (new id = position)
    removed: dict[int, list[int]]
    super_experts: list[tuple[int, int | str]]  # from the profile (absolute rule)
    removed_super_experts: list[tuple[int, int]]  # only non-empty with protection off
    protection_changes: list[ProtectionChange]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    perplexity_before: float | None
    perplexity_after: float | None
    data_source: str
    eval_source: str
    eval_tokens: int
    profile_source: str
    seconds: float
    extra: dict = field(default_factory=dict)  # method-specific details (NAEE losses, merge groups, widths)
    notes: list[str] = field(default_factory=list)  # the method's own summary lines for the console
    touched_what: str = "REMOVED"  # what happened to removed_super_experts (merged, damaged, ...)

    def to_json(self) -> dict:
        return {
            "report_version": REPORT_VERSION, "model": self.model, "model_type": self.model_type,
            "config": asdict(self.config),
            "num_experts_before": self.num_experts_before, "num_experts_after": self.num_experts_after,
            "layers": [{"layer": l, "kept": self.kept[l], "removed": self.removed[l]} for l in self.moe_layers],
            "super_experts": [{"layer": l, "expert": e} for l, e in self.super_experts],
            "removed_super_experts": [{"layer": l, "expert": e} for l, e in self.removed_super_experts],
            "protection_changes": [c.to_json() for c in self.protection_changes],
            "parameters": {"before": self.params_before, "after": self.params_after, "saved": self.params_saved},
            "bytes": {"before": self.bytes_before, "after": self.bytes_after, "saved": self.bytes_saved},
            "perplexity": {"before": self.perplexity_before, "after": self.perplexity_after,
                           "eval_source": self.eval_source, "eval_tokens": self.eval_tokens},
            "calibration": {"data": self.data_source, "profile": self.profile_source},
            "seconds": round(self.seconds, 2),
            **({"details": self.extra} if self.extra else {}),
        }


def make_result(mplan, kept: dict[int, list[int]], profile, data_source: str, model_name: str = "",
                touched=(), changes=(), extra: dict | None = None, ppl: tuple = (None, None),
                eval_source: str = "", eval_tokens: int = 0, seconds: float = 0.0, notes=(),
                touched_what: str = "REMOVED") -> PruneResult:
    """The :class:`PruneResult` of any method's pass (resident or streamed). ``mplan``: the method's
    :class:`~.methods.base.MethodPlan` (its skeleton has the final config); ``kept``: {MoE layer:
    original ids kept, new id = position}; ``touched``: Super Experts removed, merged or damaged
    (only with protection off); ``changes``: ProtectionChanges; ``extra``: the method's details."""
    sk = mplan.skeleton
    adapter = check_model(sk)
    E, ses = mplan.num_experts, profile.se_ids()
    params_after, bytes_after = model_size(sk)
    return PruneResult(
        config=mplan.config, model=model_name or type(sk).__name__, model_type=sk.config.model_type,
        num_experts_before=E, num_experts_after=adapter.num_experts(sk.config), moe_layers=list(mplan.moe_layers),
        kept={l: list(kept[l]) for l in mplan.moe_layers},
        removed={l: [e for e in range(E) if e not in kept[l]] for l in mplan.moe_layers},
        super_experts=ses, removed_super_experts=sorted(touched), protection_changes=list(changes),
        params_before=mplan.sizes_before[0], params_after=params_after, bytes_before=mplan.sizes_before[1],
        bytes_after=bytes_after, perplexity_before=ppl[0], perplexity_after=ppl[1], data_source=data_source,
        eval_source=eval_source, eval_tokens=eval_tokens,
        profile_source=f"{profile.data_source} ({profile.num_tokens} tokens)", seconds=seconds, extra=extra or {},
        notes=list(notes), touched_what=touched_what)


def remap_profile(p, r):
    """The profile as seen by the pruned model: kept experts' columns in their new order,
    the shared-expert column last, Super Experts renumbered (removed ones dropped). ``r``: a
    :class:`PruneResult`, or anything with ``kept`` ({layer: kept original ids}) and
    ``num_experts_after``."""
    E, E2 = p.num_experts, r.num_experts_after
    cols = {l: list(r.kept[l]) + [E] for l in r.kept}  # old column of each new column
    arrays = {}
    for k, v in p.arrays.items():
        if np.ndim(v) != 2:
            arrays[k] = v
            continue
        new = v[:, : E2 + 1].copy()  # dense layers keep their fill values
        for l, c in cols.items():
            new[l] = v[l, c]
        arrays[k] = new

    def renumber(ses):
        return [(l, E2 if c == E else cols[l].index(c)) for l, c in ses if l in cols and c in cols[l]]

    return dataclasses.replace(p, num_experts=E2, arrays=arrays, super_experts=renumber(p.super_experts),
                               super_experts_normalised=renumber(p.super_experts_normalised))


def summary_table(r: PruneResult) -> str:
    """A plain-text table for the console."""
    prot = "on" if r.config.protect_super_experts else "OFF"
    rows = [f"model {r.model} ({r.model_type}): method {r.config.method}, ratio {r.config.ratio}, "
            f"SE protection {prot}",
            f"experts per MoE layer {r.num_experts_before} -> {r.num_experts_after}; parameters "
            f"{r.params_before:,} -> {r.params_after:,} (saved {r.params_saved:,}, {r.bytes_saved / 2**20:.1f} MiB)",
            f"{'layer':>5}  {'removed':<28}{'SEs':<12}protection changes"]
    rows += r.notes
    ses = protected_by_layer(r.super_experts)
    changes = {c.layer: c for c in r.protection_changes}
    for l in r.moe_layers:
        c = changes.get(l)
        ch = f"spared {list(c.spared)}, removed {list(c.removed_instead)} instead" if c else ""
        rows.append(f"{l:>5}  {str(r.removed[l]):<28}{str(sorted(ses.get(l, ()))):<12}{ch}")
    if r.removed_super_experts:
        rows.append(f"{r.touched_what} Super Experts: {r.removed_super_experts}")
    if r.perplexity_before is not None:
        rows.append(f"held-out perplexity {r.perplexity_before:.3f} -> {r.perplexity_after:.3f} "
                    f"({r.eval_tokens} tokens of {r.eval_source})")
    return "\n".join(rows)
