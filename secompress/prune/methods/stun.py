"""STUN (Lee et al. 2025, arXiv 2409.06211): behaviour-similarity expert pruning, then Wanda-style
unstructured (or 2:4) pruning inside the kept experts (criterion in :mod:`secompress.prune.stun_math`,
per-layer steps in :mod:`secompress.prune.stun`).

Stage 1 reads the router rows (``stun_similarity: router``, no statistics) or the co-selection counts
of the calibration windows entering the layer in the original model (``coact``). Stage 2 reruns the
changed layer on the calibration windows propagated through the layers already pruned
(:data:`~.seed.CALIB_P`) for each kept expert's input norms. With protection a Super Expert is a
cluster of its own and is left out of stage 2 (bit-identical). The zeros are stored dense: see
:data:`secompress.prune.stun.SERVER_NOTE` for what a server can exploit (today: nothing).
"""
from __future__ import annotations

from ...checkpoints import check_model
from ..stun import SERVER_NOTE, WANDA_STATS, apply_stun, apply_wanda, decide_stun, stats_for
from .seed import CALIB_P, SeedLayers, SeedMethod


class Stun(SeedMethod):
    name = "stun"
    changes_weights = True
    touched_what = "REMOVED or ZEROED"

    def statistics(self, config):
        return stats_for(config.stun_similarity) if config.stun_similarity == "coact" else ()

    def propagated(self, config) -> bool:
        return config.stun_sparsity > 0

    def check_protection(self, pplan, layer, protected):
        pplan.check_protection(layer, protected)
        for g in pplan.groups():
            free = len(set(g) - set(protected))
            if pplan.remove_per_group > max(0, free - 1):
                raise ValueError(f"layer {layer}: {free} experts besides its Super Experts cannot form clusters that "
                                 f"remove {pplan.remove_per_group}; keep more experts or switch protection off")

    def check_config(self, skeleton, config):
        if config.stun_pattern == "2:4" and config.stun_sparsity > 0:
            ad = check_model(skeleton)
            H, I = int(skeleton.config.hidden_size), ad.intermediate_size(skeleton.config)
            if config.stun_sparsity != 0.5 or H % 4 or I % 4:
                raise ValueError(f"STUN's 2:4 pattern zeros 2 of every 4 inputs: it needs stun_sparsity 0.5 (got "
                                 f"{config.stun_sparsity}) and hidden size {H} and expert width {I} divisible by 4; "
                                 "use stun_pattern='unstructured' otherwise")

    def layer(self, step: SeedLayers, index, layer, stats, inputs):
        ad, cfg = step.src.adapter, step.mplan.config
        block = ad.block_of(layer)
        prot = step.protected.get(index, set())
        d = decide_stun(stats, ad.experts_of(block), ad.router_of(block).weight, step.pplan, prot, step.protect,
                        cfg.stun_similarity)
        keep = apply_stun(block, ad, d, ad.block_path(index))
        step.decisions[index] = d
        step.touched += [(index, e) for e in prot if e not in keep]
        if cfg.stun_sparsity > 0:
            new_ses = {keep.index(e) for e in prot if e in keep}
            s2 = step.stats_of(index, layer, inputs.hidden[CALIB_P], inputs.args[CALIB_P], WANDA_STATS)
            z = apply_wanda(block, ad, s2, new_ses if step.protect else set(), cfg.stun_sparsity, cfg.stun_pattern)
            step.extra.setdefault("zeroed", {})[index] = z
            step.touched += [(index, keep[e]) for e in new_ses if z.get(e, 0.0) > 0]
        return keep

    def report(self, step: SeedLayers) -> dict:
        cfg = step.mplan.config
        zeroed = step.extra.get("zeroed", {})
        return {"similarity": cfg.stun_similarity, "sparsity": cfg.stun_sparsity, "pattern": cfg.stun_pattern,
                "clusters": {str(l): d.to_json() for l, d in sorted(step.decisions.items())},
                "zeroed_share": {str(l): {str(e): round(v, 4) for e, v in z.items()} for l, z in sorted(zeroed.items())},
                "server": SERVER_NOTE}
