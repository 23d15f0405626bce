"""Benchmark of Super-Expert-aware RTN quantization (not a test).

    python evals/bench_quant.py [MODEL] --out bench_quant.json [--group-size 32]

MODEL defaults to evals/reference/model when it exists, else a tiny synthetic Qwen3-MoE
with one planted Super Expert (its perplexities say nothing about quality: that run only
checks that the benchmark works). Calibration (the profile: SEs and routed-token counts)
uses the built-in calibration text; perplexity uses different text: the reference
model's held-out stream (evals/reference/accept.py ``heldout_windows``), else this
repository's README. Rows, all from bf16 weights:

  bf16            the unquantized model
  rtn4-se         4-bit RTN, Super Experts kept 16-bit
  rtn4-nose       4-bit RTN, Super Experts quantized too
  alloc3-se       3.0-bit average over routed experts (MC-MoE-style ILP), SEs pinned at 16
  alloc3-nose     the same allocation without SE pinning
  bnb4-se         bitsandbytes NF4 (blocks of 64), Super Experts kept 16-bit
  bnb4-nose       bitsandbytes NF4, Super Experts quantized too
  bnb8-se         bitsandbytes LLM.int8, Super Experts kept 16-bit

Size: ``packed`` is the model held as packed codes + fp16 scales + unquantized tensors;
``disk`` is the exported folder: for RTN the stock-loadable dequantized bf16 checkpoint plus the
codes file (so larger than bf16), for bitsandbytes the packed bnb checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT / "evals" / "reference" / "model"


def _load(model_path: str | None):
    from secompress.bytetok import build_byte_tokenizer
    from secompress.checkpoints import load_model, load_tokenizer
    from secompress.testing import make_tiny, plant_super_expert

    if model_path:
        return load_model(model_path, torch.bfloat16), load_tokenizer(model_path), model_path
    model = make_tiny("qwen3_moe")
    plant_super_expert(model, layer=1, expert=5)
    return model.to(torch.bfloat16), build_byte_tokenizer(), "synthetic qwen3_moe 4x8 (SE planted at layer 1, expert 5)"


def _heldout(tok, reference: bool, n: int, seq_len: int) -> tuple[torch.Tensor, str]:
    from secompress.data import load_calibration

    if reference:
        sys.path.insert(0, str(ROOT / "evals" / "reference"))
        from accept import heldout_windows

        return heldout_windows(n, seq_len), "reference held-out stream"
    return load_calibration(str(ROOT / "README.md"), tok, n, seq_len).input_ids, "README.md"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(REFERENCE) if REFERENCE.is_dir() else None)
    ap.add_argument("--out", default="bench_quant.json")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    from secompress import ProfileConfig, profile
    from secompress.data import load_calibration
    from secompress.perplexity import perplexity
    from secompress.quant import QuantConfig, quantize_, quantized_bytes, save_quantized

    model, tok, name = _load(args.model)
    calib = load_calibration("builtin", tok, args.calib_samples, args.seq_len)
    held, held_src = _heldout(tok, args.model is not None and Path(args.model).resolve() == REFERENCE.resolve(),
                              args.eval_samples, args.seq_len)
    prof = profile(model, tok, data=calib, config=ProfileConfig(num_samples=args.calib_samples,
                                                                 seq_len=args.seq_len, batch_size=4), progress=False)
    gs = args.group_size
    variants = {
        "bf16": None,
        "rtn4-se": QuantConfig(format="dequantized", bits=4, group_size=gs, se_bits=None),
        "rtn4-nose": QuantConfig(format="dequantized", bits=4, group_size=gs, protect_super_experts=False),
        "alloc3-se": QuantConfig(format="dequantized", bits=4, group_size=gs, se_bits=None, avg_bits=3.0, fallback="rtn"),
        "alloc3-nose": QuantConfig(format="dequantized", bits=4, group_size=gs, protect_super_experts=False, avg_bits=3.0, fallback="rtn"),
        "bnb4-se": QuantConfig(method="bnb", bits=4, se_bits=None),
        "bnb4-nose": QuantConfig(method="bnb", bits=4, protect_super_experts=False),
        "bnb8-se": QuantConfig(method="bnb", bits=8, se_bits=None),
    }
    rows = []
    for label, cfg in variants.items():
        t0 = time.perf_counter()
        m = copy.deepcopy(model)
        plan = quantize_(m, cfg, profile=prof) if cfg is not None else None
        ppl = perplexity(m, held, batch_size=4)
        with tempfile.TemporaryDirectory() as d:
            if plan is None:
                m.save_pretrained(Path(d) / "o")
            else:
                save_quantized(m, tok, plan, Path(d) / "o")
            disk = _dir_bytes(Path(d) / "o")
        rows.append({"variant": label, "perplexity": ppl, "packed_bytes": quantized_bytes(m), "disk_bytes": disk,
                     "avg_bits": plan.avg_bits() if plan else 16.0,
                     "avg_bits_experts": plan.avg_bits(True) if plan else 16.0,
                     "vllm_fused_moe": plan.compatibility()["vllm-fused-moe"][0] if plan else True,
                     "seconds": round(time.perf_counter() - t0, 2)})
    print(f"model {name}; SEs {prof.se_ids()}; calibration builtin ({calib.num_tokens} tokens); "
          f"perplexity on {held_src} ({held.numel()} tokens), group size {gs}")
    print(f"{'variant':<13}{'ppl':>10}{'avg bits':>10}{'experts':>9}{'packed MiB':>12}{'disk MiB':>10}")
    for r in rows:
        print(f"{r['variant']:<13}{r['perplexity']:>10.3f}{r['avg_bits']:>10.3f}{r['avg_bits_experts']:>9.3f}"
              f"{r['packed_bytes'] / 2**20:>12.3f}{r['disk_bytes'] / 2**20:>10.3f}")
    Path(args.out).write_text(json.dumps({"model": name, "super_experts": prof.se_ids(), "group_size": gs,
                                          "eval": held_src, "eval_tokens": held.numel(), "rows": rows},
                                         indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
