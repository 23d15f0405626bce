"""Perplexity and size on disk of GPTQ exports, SE-aware or not (not a test).

    python evals/bench_gptq_quality.py [MODEL] [--group-size 32]

gptqmodel quantizes the bf16 checkpoint (in a child process, see secompress/quant/gptq.py)
with the builtin calibration text. The reference model has experts that calibration never
reaches (8 of 128 get no token even from 32k tokens), so every row runs with the explicit RTN
fallback: those experts, and any under gptqmodel's 0.5% token threshold, are RTN-quantized; each export is reloaded with ``GPTQModel.load`` in a
fresh process and scored on held-out text (the reference model's held-out stream).
Rows:

  bf16          the unquantized checkpoint (in this process)
  gptq4-se      4-bit GPTQ, Super Experts kept 16-bit (a `dynamic` override)
  gptq4-nose    4-bit GPTQ, plain gptqmodel (Super Experts quantized too)
  alloc3-se     3.0-bit average over routed experts (MC-MoE-style ILP), SEs pinned at 16
  alloc3-nose   the same allocation without SE pinning
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "evals" / "reference"))


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:  # [N, S, V], [N, S]
    from secompress.perplexity import nll_sum

    loss, n = nll_sum(logits, ids)
    return math.exp(loss / n)


def main() -> None:
    from accept import heldout_windows

    from secompress.data import load_calibration
    from secompress.perplexity import perplexity
    from secompress.checkpoints import load_model, load_tokenizer
    from secompress.profile import ProfileConfig, profile
    from secompress.quant.api import QuantConfig, plan_quantization
    from secompress.quant.gptq import gptq_quantize, reload_logits

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
    variants = {  # label: (plan config, SE-aware overrides)
        "gptq4-se": (QuantConfig(format="dequantized", bits=4, group_size=gs, se_bits=None, fallback="rtn"), True),
        "gptq4-nose": (QuantConfig(format="dequantized", bits=4, group_size=gs, se_bits=None, fallback="rtn"), False),
        "alloc3-se": (QuantConfig(format="dequantized", bits=4, group_size=gs, se_bits=None, avg_bits=3.0, candidate_bits=(2, 3, 4, 8),
                                  fallback="rtn"), True),
        "alloc3-nose": (QuantConfig(format="dequantized", bits=4, group_size=gs, protect_super_experts=False, avg_bits=3.0,
                                    candidate_bits=(2, 3, 4, 8), fallback="rtn"), True),
    }
    with tempfile.TemporaryDirectory() as d:
        for label, (cfg, aware) in variants.items():
            plan = plan_quantization(model, cfg, profile=prof)
            out = Path(d) / label
            gptq_quantize(args.model, tok, plan, calib.input_ids, out, bits=4, group_size=gs, se_aware=aware,
                          fallback="rtn")
            logits = reload_logits(out, held)
            rows.append({"variant": label, "perplexity": _ppl(logits, held),
                         "disk_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
                         "avg_bits": plan.avg_bits() if aware else 4.0})
    tokens = prof.arrays["tokens"][:, :-1]  # [L, E] routed tokens per expert
    print(f"experts without calibration tokens: {int((tokens == 0).sum())}; under 0.5% of them: "
          f"{int((tokens < 0.005 * calib.num_tokens).sum())} (gptqmodel's RTN fallback)")
    print(f"model {args.model}; SEs {prof.se_ids()}; calibration builtin ({calib.num_tokens} tokens); "
          f"perplexity on the reference held-out stream ({held.numel()} tokens); group size {gs}")
    print(f"{'variant':<13}{'ppl':>9}{'avg bits':>10}{'disk MiB':>10}")
    for r in rows:
        print(f"{r['variant']:<13}{r['perplexity']:>9.3f}{r['avg_bits']:>10.3f}{r['disk_bytes'] / 2**20:>10.2f}")
    Path(args.out).write_text(json.dumps({"model": args.model, "super_experts": prof.se_ids(), "rows": rows},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
