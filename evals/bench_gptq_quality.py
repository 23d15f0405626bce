"""Perplexity and size on disk of GPTQ exports, SE-aware or not (not a test).

    python evals/bench_gptq_quality.py [MODEL] [--group-size 32]

secompress's in-process GPTQ (secompress/quant/gptq_layers.py) quantizes the bf16 checkpoint with the
builtin calibration text, every expert calibrated on every token (all-expert calibration: the
reference model has experts that routed calibration never reaches); each export
(compressed-tensors, the SE's layer 16-bit where protected) is reloaded with ``secompress.load``
and scored on held-out text (the reference model's held-out stream).
Rows:

  bf16          the unquantized checkpoint
  gptq4-se      4-bit GPTQ, the Super Expert's layer kept 16-bit
  gptq4-nose    4-bit GPTQ, Super Experts quantized too
  alloc3-se     3.0-bit average over routed experts (MC-MoE-style ILP, per layer), SE layer pinned at 16
  alloc3-nose   the same allocation without SE pinning
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "evals" / "reference"))


def main() -> None:
    from accept import heldout_windows

    import secompress
    from secompress.checkpoints import load_model, load_tokenizer
    from secompress.data import load_calibration
    from secompress.perplexity import perplexity
    from secompress.profile import ProfileConfig, profile
    from secompress.quant.api import QuantConfig, quantize_, save_quantized

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "evals" / "reference" / "model"))
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--out", default="bench_gptq_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(args.model, torch.bfloat16), load_tokenizer(args.model)
    calib = load_calibration("builtin", tok, args.samples, args.seq_len)
    held = heldout_windows(args.eval_samples, args.seq_len)
    prof = profile(model, tok, data=calib, config=ProfileConfig(num_samples=args.samples, seq_len=args.seq_len),
                   progress=False)
    gs = args.group_size
    rows = [{"variant": "bf16", "perplexity": perplexity(model, held, 4),
             "disk_bytes": sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors")), "avg_bits": 16.0}]
    common = dict(method="gptq", bits=4, group_size=gs, se_bits=None, calibration="all-experts")
    variants = {
        "gptq4-se": QuantConfig(**common),
        "gptq4-nose": QuantConfig(**common, protect_super_experts=False),
        "alloc3-se": QuantConfig(**common, avg_bits=3.0, candidate_bits=(2, 3, 4, 8)),
        "alloc3-nose": QuantConfig(**common, protect_super_experts=False, avg_bits=3.0, candidate_bits=(2, 3, 4, 8)),
    }
    with tempfile.TemporaryDirectory() as d:
        for label, cfg in variants.items():
            m = copy.deepcopy(model)
            plan = quantize_(m, cfg, profile=prof, tokenizer=tok, data=calib)
            out = save_quantized(m, tok, plan, Path(d) / label)
            rows.append({"variant": label, "perplexity": perplexity(secompress.load(out), held, 4),
                         "disk_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
                         "avg_bits": plan.avg_bits()})
            del m
    tokens = prof.arrays["tokens"][:, :-1]  # [L, E] routed tokens per expert
    print(f"experts routed calibration leaves without tokens: {int((tokens == 0).sum())} (all-expert calibration "
          "reaches them)")
    print(f"model {args.model}; SEs {prof.se_ids()}; calibration builtin ({calib.num_tokens} tokens); "
          f"perplexity on the reference held-out stream ({held.numel()} tokens); group size {gs}")
    print(f"{'variant':<13}{'ppl':>9}{'avg bits':>10}{'disk MiB':>10}")
    for r in rows:
        print(f"{r['variant']:<13}{r['perplexity']:>9.3f}{r['avg_bits']:>10.3f}{r['disk_bytes'] / 2**20:>10.2f}")
    Path(args.out).write_text(json.dumps({"model": args.model, "super_experts": prof.se_ids(), "rows": rows},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
