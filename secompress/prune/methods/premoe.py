"""PreMoe (Pei et al. 2025, arXiv 2505.17639): each MoE layer keeps the experts with the highest
task-conditioned expected selection score on the task's calibration data (criterion in
:mod:`secompress.prune.premoe_math`, per-layer decision in :mod:`secompress.prune.premoe`).

The calibration data is the task's (``data`` of ``prune``, ``data.calibration`` of a recipe); task
data below ``task_min_tokens`` is refused before the profile. One variant per task and the retrieval
index: :func:`secompress.prune.task_jobs.premoe_variants`, ``secompress premoe``.
"""
from __future__ import annotations

from ..premoe import STATS, apply_premoe, decide_premoe
from .seed import SeedLayers, SeedMethod


class PreMoe(SeedMethod):
    name = "premoe"
    task = True

    def statistics(self, config):
        return STATS

    def layer(self, step: SeedLayers, index, layer, stats, inputs):
        ad = step.src.adapter
        prot = step.protected.get(index, set())
        d = decide_premoe(stats, step.pplan, prot, step.protect)
        step.decisions[index] = d
        step.touched += [(index, e) for e in prot if e not in d.keep]
        return apply_premoe(ad.block_of(layer), ad, d, ad.block_path(index))

    def report(self, step: SeedLayers) -> dict:
        cfg = step.mplan.config
        return {"tcess_top_k": cfg.tcess_top_k or step.src.adapter.top_k(step.src.config),
                "tcess_threshold": cfg.tcess_threshold,
                "layers": {str(l): d.to_json() for l, d in sorted(step.decisions.items())}}
