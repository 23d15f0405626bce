"""Benchmark of SE-protected expert pruning (not a test).

    python evals/bench_prune.py [MODEL] --out bench_prune.json [--quick]

MODEL defaults to evals/reference/model when it exists, else a tiny synthetic
Qwen3-MoE with one planted Super Expert (its perplexities say nothing about quality:
that run only checks that the benchmark works). Measured in this one run, on the
same held-out windows (those after the calibration windows of the built-in text):

  1. perplexity after removing 25% and 50% of each MoE layer's routed experts, for
     every method (frequency, reap, easy_ep, naee, random), with Super-Expert
     protection on and off;
  2. the ablation of Su et al. 2025 (arXiv 2507.23279, Sec. 4): perplexity with the
     Super Experts' outputs zeroed vs with as many random non-SE experts zeroed
     (same layers, routed experts; mean and std over --draws draws).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT / "evals" / "reference" / "model"
METHODS = ("frequency", "reap", "easy_ep", "naee", "random")


def _load(model_path: str | None):
    from secompress.bytetok import build_byte_tokenizer
    from secompress.checkpoints import load_model, load_tokenizer
    from secompress.testing import make_tiny, plant_super_expert

    if model_path:
        return load_model(model_path), load_tokenizer(model_path), model_path
    model = make_tiny("qwen3_moe")
    plant_super_expert(model, layer=1, expert=5)
    return model, build_byte_tokenizer(), "synthetic qwen3_moe 4x8 (SE planted at layer 1, expert 5)"


def _windows(tok, calib: int, held: int, seq_len: int):
    from secompress.data import CalibrationData, load_calibration

    d = load_calibration("builtin", tok, calib + held, seq_len)
    n = d.input_ids.shape[0]
    cut = max(1, n - held) if n < calib + held else calib
    if cut >= n:
        raise SystemExit(f"the built-in text gives only {n} windows of {seq_len}; use a shorter --seq-len")
    return (CalibrationData(d.input_ids[:cut], d.source, d.sha256),
            CalibrationData(d.input_ids[cut:], f"{d.source} held-out windows {cut}..{n - 1}", d.sha256))


def sweep(model, tok, prof, calib, held, ratios, methods, args) -> list[dict]:
    from secompress.prune import PruneConfig, prune

    rows = []
    for ratio in ratios:
        for method in methods:
            for protect in (True, False):
                cfg = PruneConfig(ratio, method, protect_super_experts=protect, seed=args.seed,
                                  calib_samples=calib.input_ids.shape[0], eval_samples=held.input_ids.shape[0],
                                  seq_len=calib.input_ids.shape[1], batch_size=args.batch_size)
                row = {"ratio": ratio, "method": method, "se_protection": protect}
                t = time.perf_counter()
                try:
                    r = prune(copy.deepcopy(model), tok, cfg, profile=prof, data=calib, eval_data=held)
                except ValueError as e:  # e.g. protection impossible at this ratio
                    row.update(error=str(e))
                else:
                    row.update(perplexity=r.perplexity_after, experts_after=r.num_experts_after,
                               removed_super_experts=len(r.removed_super_experts),
                               protection_changes=len(r.protection_changes), params_saved=r.params_saved)
                row["seconds"] = round(time.perf_counter() - t, 2)
                rows.append(row)
                print(f"  ratio {ratio} {method:<9} protect={protect!s:<5} "
                      + (f"ppl {row['perplexity']:.3f}" if "perplexity" in row else f"error: {row['error']}"),
                      flush=True)
    return rows


def ablation(model, prof, held, draws: int, seed: int, batch_size: int) -> dict:
    from secompress.ablate import zero_experts
    from secompress.perplexity import perplexity

    ses = prof.se_ids()
    if not ses:
        return {"super_experts": [], "note": "the profile found no Super Expert: nothing to ablate"}
    E = prof.num_experts
    routed_ses = {(l, e) for l, e in ses if e != "shared"}
    rng = random.Random(seed)
    with zero_experts(model, ses):
        ppl_se = perplexity(model, held.input_ids, batch_size)
    ppl_rand = []
    for _ in range(draws):
        pick = []
        for l, _e in ses:  # one random non-SE routed expert of the same layer per SE
            pool = [e for e in range(E) if (l, e) not in routed_ses and (l, e) not in pick]
            pick.append((l, rng.choice(pool)))
        with zero_experts(model, pick):
            ppl_rand.append(perplexity(model, held.input_ids, batch_size))
    return {"super_experts": [[l, e] for l, e in ses], "perplexity_zero_super_experts": ppl_se,
            "perplexity_zero_random_mean": float(np.mean(ppl_rand)),
            "perplexity_zero_random_std": float(np.std(ppl_rand)), "draws": draws,
            "perplexity_zero_random": ppl_rand}


def table(res: dict) -> str:
    lines = [f"model: {res['model']}", f"baseline perplexity {res['baseline_perplexity']:.3f} "
             f"({res['eval_tokens']} held-out tokens)",
             f"{'ratio':>5}  {'method':<10}{'protected':>12}{'unprotected':>13}{'SEs removed (unprot.)':>23}"]
    rows = {(r["ratio"], r["method"], r["se_protection"]): r for r in res["pruning"]}
    fmt = lambda r: f"{r['perplexity']:.3f}" if "perplexity" in r else "error"
    for ratio in res["ratios"]:
        for m in res["methods"]:
            p, u = rows[(ratio, m, True)], rows[(ratio, m, False)]
            lines.append(f"{ratio:>5}  {m:<10}{fmt(p):>12}{fmt(u):>13}{u.get('removed_super_experts', '-'):>23}")
    a = res["ablation"]
    if "perplexity_zero_super_experts" in a:
        lines.append(f"ablation ({len(a['super_experts'])} SEs {a['super_experts']}): zero SEs -> ppl "
                     f"{a['perplexity_zero_super_experts']:.3f}; zero as many random non-SE experts -> "
                     f"{a['perplexity_zero_random_mean']:.3f} +- {a['perplexity_zero_random_std']:.3f} "
                     f"({a['draws']} draws)")
    else:
        lines.append(f"ablation: {a['note']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(REFERENCE) if REFERENCE.exists() else None,
                    help="checkpoint (default: evals/reference/model if present, else a tiny synthetic model)")
    ap.add_argument("--out", required=True, help="where to write the results as JSON")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--eval-samples", type=int, default=8, help="held-out windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--draws", type=int, default=10, help="random draws of the ablation's control (>= 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="4 + 2 windows of 64 tokens")
    args = ap.parse_args()
    if args.draws < 10:
        ap.error("--draws must be >= 10")
    if args.quick:
        args.samples, args.eval_samples, args.seq_len = 4, 2, 64
    torch.set_num_threads(1)

    from secompress.perplexity import perplexity
    from secompress.profile import ProfileConfig, profile

    t0 = time.perf_counter()
    model, tok, name = _load(args.model)
    calib, held = _windows(tok, args.samples, args.eval_samples, args.seq_len)
    prof = profile(model, tok, data=calib, config=ProfileConfig(num_samples=calib.input_ids.shape[0],
                   seq_len=args.seq_len, batch_size=args.batch_size), progress=False)
    print(f"profiled {name}: Super Experts {prof.se_ids()}", flush=True)
    res = {"model": name, "eval_tokens": held.num_tokens, "calibration_tokens": calib.num_tokens,
           "ratios": args.ratios, "methods": args.methods,
           "baseline_perplexity": perplexity(model, held.input_ids, args.batch_size),
           "super_experts": [[l, e] for l, e in prof.se_ids()]}
    res["pruning"] = sweep(model, tok, prof, calib, held, args.ratios, args.methods, args)
    res["ablation"] = ablation(model, prof, held, args.draws, args.seed, args.batch_size)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(table(res))
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
