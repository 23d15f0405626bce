"""Wall time of SE-aware GPTQ vs plain gptqmodel on the same config (not a test).

    python evals/bench_gptq.py [MODEL] [--reps 2]

Both runs use gptqmodel with the same bits, group size and calibration windows; the
SE-aware run adds the plan's ``dynamic`` overrides (Super Experts skipped, kept 16-bit).
Times are gptqmodel's quantize step in a child process, best of --reps, interleaved.
Goal: SE-aware / plain <= 1.10x.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from secompress.data import load_calibration
    from secompress.checkpoints import load_model, load_tokenizer
    from secompress.profile import ProfileConfig, profile
    from secompress.quant.api import QuantConfig, plan_quantization
    from secompress.quant.gptq import gptq_quantize

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(ROOT / "evals" / "reference" / "model"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    calib = load_calibration("builtin", tok, args.samples, args.seq_len)
    prof = profile(model, tok, data=calib, config=ProfileConfig(num_samples=args.samples, seq_len=args.seq_len),
                   progress=False)
    plan = plan_quantization(model, QuantConfig(format="dequantized", bits=args.bits, group_size=args.group_size), profile=prof)
    times = {True: [], False: []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.reps):
            for aware in (False, True):
                info = gptq_quantize(args.model, tok, plan, calib.input_ids, Path(d) / f"{aware}{r}", bits=args.bits,
                                     group_size=args.group_size, se_aware=aware)
                times[aware].append(info["quantize_s"])
                if aware:
                    print(f"overrides: {info['dynamic']}")
    a, p = min(times[True]), min(times[False])
    print(f"model {args.model}; SEs {prof.se_ids()}; {calib.num_tokens} calibration tokens; {args.bits}-bit, "
          f"group {args.group_size}; best of {args.reps}")
    print(f"plain gptqmodel {p:.2f}s  SE-aware {a:.2f}s  ratio {a / p:.3f}x (goal <= 1.10x)")


if __name__ == "__main__":
    main()
