"""Export sizes on disk: what the scale dtype and the export dtype cost (not a test).

    python evals/bench_export_size.py [MODEL] [--group-size 32] [--out FILE.json]

One RTN quantization of MODEL (default: the bundled reference model; 4-bit symmetric, every weight
quantized, computed in float32 as the reference recipe does), written by each writer over the same
model in memory, with the size each export states (its ``ExportSummary``) checked against the files:

    ct                    compressed-tensors, scales in the model's 16-bit dtype (the default)
    ct-scale-float32      compressed-tensors, float32 scales (``scale_dtype: float32``)
    ct-all-float32        compressed-tensors, every tensor in the compute dtype (float32), as the
                          float32-evaluating reference recipe wrote it before the export dtype existed
    dequantized           the dequantized checkpoint + the codes (subfolder)
    source                the checkpoint itself
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from secompress.checkpoints import load_model
    from secompress.quant import QuantConfig, quantize_, save_quantized

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "evals" / "reference" / "model"))
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    src = Path(a.model)
    rows = {"source": sum(f.stat().st_size for f in src.glob("*.safetensors"))}
    variants = {"ct": ("model", None, None), "ct-scale-float32": ("float32", None, None),
                "ct-all-float32": ("float32", None, torch.float32), "dequantized": ("model", "dequantized", None)}
    with tempfile.TemporaryDirectory() as d:
        for name, (scale, fmt, dtype) in variants.items():
            model = load_model(src, torch.float32)
            plan = quantize_(model, QuantConfig(bits=4, group_size=a.group_size, symmetric=True, scale_dtype=scale,
                                                protect_super_experts=False, format=fmt))
            out = save_quantized(model, None, plan, Path(d) / name, dtype=dtype)
            s = plan.artifacts["export"]
            files = sum((out / f).stat().st_size for f in s.files)
            assert files == s.bytes, (name, files, s.bytes)
            rows[name] = s.bytes
    base = rows["ct"]
    print(f"{'export':<20}{'bytes':>12}{'MiB':>8}{'x source':>10}{'vs ct':>8}")
    for name, b in rows.items():
        print(f"{name:<20}{b:>12,}{b / 2**20:>8.2f}{b / rows['source']:>10.3f}{b / base - 1:>+8.1%}")
    if a.out:
        a.out.write_text(json.dumps({"model": str(src), "group_size": a.group_size, "bytes": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
