"""DERN (Zhou et al. 2025, arXiv 2509.10377): drop the experts the router uses least, split each into
neuron segments, recombine every segment into the most similar neuron of a retained expert (criterion
in :mod:`secompress.prune.dern_math`, per-layer decision in :mod:`secompress.prune.dern`).

Decided per layer from the routing of the calibration windows entering it in the original model and
from the layer's own weights; with protection a Super Expert is never dropped and receives no segment.
"""
from __future__ import annotations

from ..dern import STATS, apply_dern, decide_dern
from .seed import SeedLayers, SeedMethod


class Dern(SeedMethod):
    name = "dern"
    changes_weights = True
    touched_what = "DROPPED or CHANGED"

    def statistics(self, config):
        return STATS

    def layer(self, step: SeedLayers, index, layer, stats, inputs):
        ad = step.src.adapter
        block = ad.block_of(layer)
        prot = step.protected.get(index, set())
        d = decide_dern(stats, ad.experts_of(block), step.pplan, prot, step.protect, step.mplan.config.dern_threshold)
        step.decisions[index] = d
        step.touched += [(index, e) for e in prot if e in d.dropped or e in d.receivers()]
        return apply_dern(block, ad, d, stats.freq, ad.block_path(index))

    def report(self, step: SeedLayers) -> dict:
        return {"threshold": step.mplan.config.dern_threshold,
                "layers": {str(l): d.to_json() for l, d in sorted(step.decisions.items())}}
