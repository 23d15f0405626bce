"""DERN, pure math: split dropped experts into neuron segments and recombine them into kept experts.

DERN (Zhou, Zhao, Cheng, Wu, Gui, Yang, Wu, Cheng, Fan 2025, "Dropping Experts, Recombining
Neurons: Retraining-Free Pruning for Sparse Mixture-of-Experts LLMs", Findings of EMNLP 2025,
arXiv 2509.10377) works in three steps per MoE layer:
  1. drop the least important experts by **router statistics** (here: the sum of the routing
     weights the expert received over the calibration tokens, the router's own measure of use);
  2. split every dropped expert into **neuron-level segments** (segment j of expert d: the gate and
     up rows j and the down_proj column j, the part of the expert that neuron j computes) and
     assign each segment to the **most compatible retained expert**: the retained expert holding
     the neuron most similar to the segment (cosine similarity of the concatenated gate row, up row
     and down column); a segment less similar than ``threshold`` to every retained neuron is left out;
  3. **merge the segments inside each retained expert**: each retained neuron is averaged with the
     segments assigned to it, weighted by routing frequency (the retained expert's for its own
     neuron, the dropped expert's for a segment), so the expert keeps its width.
The paper's text beyond its abstract was not reachable while this was written: the router statistic,
the similarity and the weighting above are this implementation's reading of the three steps, stated.

Super Experts (Su et al. 2025, arXiv 2507.23279), when protected, are never dropped and never
receive a segment, so they stay bit-identical.
Legend: E experts, I neurons per expert, H hidden size, D segment feature length (2H, + 2 with biases), R retained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

Weights = dict[str, torch.Tensor]  # gate_proj/up_proj [I, H], down_proj [H, I], optional *_bias
NEURON_KEYS = ("gate_proj", "up_proj", "gate_proj_bias", "up_proj_bias")  # indexed by neuron on dim 0


@dataclass(frozen=True)
class Segment:
    """Neuron ``neuron`` of dropped expert ``source`` goes to neuron ``target_neuron`` of retained
    expert ``target`` (cosine ``similarity``); ``target`` is None when it was left out."""

    source: int
    neuron: int
    target: int | None
    target_neuron: int | None
    similarity: float


def segment_features(w: Weights) -> torch.Tensor:
    """[I, 2H (+2)]: each neuron's gate row, up row and down column (and gate/up biases), float32
    (the similarity bank of a large layer is R*I x 2H: float32 halves it)."""
    parts = [w["gate_proj"], w["up_proj"], w["down_proj"].T]
    if "gate_proj_bias" in w:
        parts += [w["gate_proj_bias"][:, None], w["up_proj_bias"][:, None]]
    return torch.cat([p.detach().float().cpu() for p in parts], dim=1)


def assign_segments(dropped: Mapping[int, Weights], retained: Mapping[int, Weights], threshold: float = 0.0
                    ) -> list[Segment]:
    """Every neuron of every dropped expert, assigned to the most similar neuron of any retained expert
    (ties: lower expert id, then lower neuron), or left out below ``threshold``."""
    if not retained:
        raise ValueError("DERN needs at least one retained expert to recombine segments into")
    ids = sorted(retained)
    bank = torch.cat([torch.nn.functional.normalize(segment_features(retained[r]), dim=1) for r in ids])  # [R*I, D]
    owner = torch.tensor([r for r in ids for _ in range(retained[r]["gate_proj"].shape[0])])
    local = torch.cat([torch.arange(retained[r]["gate_proj"].shape[0]) for r in ids])
    out = []
    for d in sorted(dropped):
        feats = torch.nn.functional.normalize(segment_features(dropped[d]), dim=1)  # [I, D]
        sim = feats @ bank.T  # [I, R*I]
        best = sim.argmax(1)  # first maximum: lower expert, then lower neuron
        for j in range(feats.shape[0]):
            s = float(sim[j, best[j]])
            if s < threshold:
                out.append(Segment(d, j, None, None, s))
            else:
                out.append(Segment(d, j, int(owner[best[j]]), int(local[best[j]]), s))
    return out


def merge_segments(base: Weights, base_weight: float, segments: Sequence[tuple[int, Weights, int, float]]) -> Weights:
    """Retained expert ``base`` with segments merged in: each ``(target_neuron, source weights, source
    neuron, weight)`` is averaged into that neuron with ``weight`` against ``base_weight``. Weights
    below 1 count as 1 (an expert no calibration token reached still counts). Returns new tensors in
    the base's dtype; neurons that receive nothing are copied unchanged."""
    bw = max(float(base_weight), 1.0)
    acc = {k: v.detach().double() * bw for k, v in base.items() if k in (*NEURON_KEYS, "down_proj")}
    tot = torch.full((base["gate_proj"].shape[0],), bw, dtype=torch.float64)
    for i, src, j, w in segments:
        w = max(float(w), 1.0)
        tot[i] += w
        for k in NEURON_KEYS:
            if k in acc:
                acc[k][i] += w * src[k][j].detach().double()
        acc["down_proj"][:, i] += w * src["down_proj"][:, j].detach().double()
    out = {}
    for k, v in base.items():
        if k in NEURON_KEYS:
            out[k] = (acc[k] / tot.reshape(-1, *([1] * (acc[k].ndim - 1)))).to(v.dtype)
        elif k == "down_proj":
            out[k] = (acc[k] / tot[None, :]).to(v.dtype)
        else:
            out[k] = v.detach().clone()  # down_proj_bias: the retained expert's own
    untouched = torch.ones_like(tot, dtype=torch.bool)
    for i, *_ in segments:
        untouched[i] = False
    for k in NEURON_KEYS:  # bit-exact copies where nothing was merged
        if k in out:
            out[k][untouched] = base[k][untouched]
    out["down_proj"][:, untouched] = base["down_proj"][:, untouched]
    return out


def recombination_summary(segments: Sequence[Segment]) -> dict:
    """Counts and similarity statistics of a layer's assignment, for the report."""
    kept = [s for s in segments if s.target is not None]
    sims = np.asarray([s.similarity for s in kept]) if kept else np.zeros(0)
    per_target: dict[int, int] = {}
    for s in kept:
        per_target[s.target] = per_target.get(s.target, 0) + 1
    return {"segments": len(segments), "assigned": len(kept), "left_out": len(segments) - len(kept),
            "mean_similarity": round(float(sims.mean()), 4) if kept else None,
            "segments_per_retained_expert": {str(k): v for k, v in sorted(per_target.items())}}
