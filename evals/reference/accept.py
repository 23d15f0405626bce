"""Acceptance figures of a reference-model checkpoint: is the Super-Expert phenomenon real?

    python evals/reference/accept.py MODEL_DIR [--json out.json]

Measured on the held-out split of the corpus (evals/reference/corpus.py):
  1. massive activation: per layer, max |hidden| at the first token / median |hidden|
     (goal: >= 100x in some layer);
  2. SEs flagged by the project's profiler with the paper's rule (Su et al. 2025) and with
     the layer-normalised variant (goal: >= 1 with the paper's rule);
  3. ablation: held-out loss with the SEs' outputs zeroed vs with as many random non-SE
     experts zeroed, mean over --draws draws (goal: >= 3x the loss increase);
  4. attention sink: attention mass on the first token, baseline vs SEs zeroed.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import load_corpus  # noqa: E402

from secompress.ablate import zero_experts  # noqa: E402
from secompress.bytetok import BOS_ID  # noqa: E402
from secompress.data import CalibrationData  # noqa: E402
from secompress.perplexity import mean_loss  # noqa: E402
from secompress.instrument import Recorder, instrument  # noqa: E402
from secompress.checkpoints import load_model  # noqa: E402
from secompress.profile import ProfileConfig, profile  # noqa: E402


def heldout_windows(n: int, seq: int, offset: int = 0) -> torch.Tensor:
    """[n, seq] windows of the held-out stream, BOS first."""
    held = load_corpus().heldout
    body = seq - 1
    rows = [torch.cat([torch.tensor([BOS_ID]), held[offset + i * body: offset + (i + 1) * body].long()])
            for i in range(n)]
    return torch.stack(rows)


@torch.no_grad()
def sink_mass(model, ids: torch.Tensor) -> np.ndarray:
    """[L] mean attention mass that queries 1.. put on the first token."""
    rec = Recorder(seq_len=ids.shape[1])
    from secompress.adapters import get_adapter

    with instrument(model, get_adapter(model.config), rec):
        for chunk in ids.split(8):
            model(input_ids=chunk)
    return np.array([np.mean(rec.sink_mass[l]) for l in sorted(rec.sink_mass)])


def accept(model_dir: str, draws: int = 10, seed: int = 0, n_eval: int = 48, seq: int = 512) -> dict:
    torch.set_num_threads(2)
    model = load_model(model_dir)
    calib = CalibrationData(heldout_windows(32, seq), "corpus held-out split", "heldout[0:32 windows]")
    prof = profile(model, data=calib, config=ProfileConfig(num_samples=32, seq_len=seq), progress=False)
    ratios = prof.massive_ratios()
    ses = prof.se_ids()
    eval_ids = heldout_windows(n_eval, seq, offset=32 * (seq - 1))  # disjoint from the calibration windows
    base = mean_loss(model, eval_ids)
    fig = {
        "model": str(model_dir),
        "corpus_sha256": load_corpus().sha256,
        "calibration": "held-out windows 0-31 (BOS + 511 bytes each)",
        "evaluation": f"held-out windows 32-{32 + n_eval - 1}",
        "heldout_loss_nats_per_byte": base,
        "massive_ratio_per_layer": [round(float(r), 1) for r in ratios],
        "max_massive_ratio": round(float(np.nanmax(ratios)), 1),
        "super_experts_paper_rule": [list(map(lambda x: x if isinstance(x, str) else int(x), s)) for s in ses],
        "super_experts_layer_normalised": [[int(l), e if isinstance(e, str) else int(e)]
                                           for l, e in prof.se_ids(normalised=True)],
        "se_output_max": [float(prof.arrays["out_max"][l, prof.num_experts if e == "shared" else e]) for l, e in ses],
    }
    if ses:
        with zero_experts(model, ses):
            se_loss = mean_loss(model, eval_ids)
            se_sink = sink_mass(model, eval_ids[:16])
        rng = random.Random(seed)
        pool = [(l, e) for l in prof.moe_layers for e in range(prof.num_experts) if (l, e) not in ses]
        rand_losses = []
        for _ in range(draws):
            with zero_experts(model, rng.sample(pool, len(ses))):
                rand_losses.append(mean_loss(model, eval_ids))
        base_sink = sink_mass(model, eval_ids[:16])
        d_se = se_loss - base
        d_rand = float(np.mean(rand_losses)) - base
        fig.update({
            "loss_se_zeroed": se_loss,
            "loss_random_zeroed_mean": float(np.mean(rand_losses)),
            "loss_random_zeroed_all": rand_losses,
            "loss_increase_se": d_se,
            "loss_increase_random_mean": d_rand,
            "ablation_ratio": d_se / d_rand if d_rand > 0 else float("inf"),
            "sink_mass_baseline": [round(float(x), 4) for x in base_sink],
            "sink_mass_se_zeroed": [round(float(x), 4) for x in se_sink],
        })
    fig["pass"] = {
        "massive_activation_100x": fig["max_massive_ratio"] >= 100,
        "paper_rule_flags_se": bool(ses),
        "ablation_3x": bool(ses) and fig["ablation_ratio"] >= 3,
        "sink_collapse": bool(ses) and float(np.mean(fig["sink_mass_se_zeroed"][1:])) <
        0.5 * float(np.mean(fig["sink_mass_baseline"][1:])),
    }
    return fig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--draws", type=int, default=10)
    args = ap.parse_args()
    fig = accept(args.model, draws=args.draws)
    print(json.dumps(fig, indent=1))
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1))


if __name__ == "__main__":
    main()
