"""UNCURL (Sarkar et al. 2024, arXiv 2409.01483): each MoE layer's experts are clustered by spectral
clustering of their router logits on the task's data and each cluster merged (aligned, weighted by
routing frequency) into its most routed member (criterion in :mod:`secompress.prune.uncurl_math`,
per-layer decision in :mod:`secompress.prune.uncurl`).

Every layer keeps the same count (exportable); the report gives each layer's eigengap estimate and
the adaptive counts the same budget would give. Applying those (in memory only):
:func:`secompress.prune.task_jobs.uncurl_adaptive`; the threshold factor where task quality drops:
:func:`secompress.prune.task_jobs.uncurl_threshold`.
"""
from __future__ import annotations

from ..merge import check_groups
from ..merging import merge_targets
from ..uncurl import STATS, adaptive_counts, apply_uncurl, decide_uncurl, estimate_count
from .seed import SeedLayers, SeedMethod


class Uncurl(SeedMethod):
    name = "uncurl"
    task = True
    changes_weights = True
    touched_what = "MERGED"

    def statistics(self, config):
        return STATS

    def check_protection(self, pplan, layer, protected):
        check_groups(merge_targets(pplan), pplan.groups(), protected, f"layer {layer}: ")

    def layer(self, step: SeedLayers, index, layer, stats, inputs):
        ad = step.src.adapter
        prot = step.protected.get(index, set())
        d = decide_uncurl(stats, step.pplan, prot if step.protect else (), seed=step.mplan.config.seed)
        step.decisions[index] = d
        step.extra.setdefault("estimates", {})[index] = estimate_count(stats, step.pplan, prot if step.protect else ())
        step.touched += [(index, e) for g in d.groups if len(g) > 1 for e in g if e in prot]
        return apply_uncurl(ad.block_of(layer), ad, d, stats.freq, ad.block_path(index))

    def report(self, step: SeedLayers) -> dict:
        est = step.extra.get("estimates", {})
        prot = step.protected if step.protect else {}
        try:
            adaptive = {str(l): c for l, c in adaptive_counts(est, step.pplan, prot).items()} if est else {}
        except ValueError as e:  # grouped routing
            adaptive = {"not available": str(e)}
        return {"experts_per_layer": step.pplan.num_keep, "eigengap_estimate": {str(l): c for l, c in est.items()},
                "adaptive_counts_same_budget": adaptive,
                "groups": {str(l): d.to_json() for l, d in sorted(step.decisions.items())},
                "router": "each cluster keeps its most routed member's router row (first id of the group)"}
