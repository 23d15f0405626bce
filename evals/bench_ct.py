"""compressed-tensors exports: size on disk, perplexity after reloading, and evaluation speed of the
fused quantized experts vs bf16 (not a test).

    python evals/bench_ct.py [MODEL] [--group-size 32] [--out bench_ct.json]

On the reference model (bf16, builtin calibration text, held-out stream of the reference corpus):

  size/perplexity rows, each exported with ``save_ct`` and reloaded with ``secompress.load``:
    bf16          the checkpoint
    rtn4          4-bit symmetric RTN, every weight quantized
    gptq4         4-bit symmetric GPTQ (in process, RTN fallback for uncalibrated experts)
    gptq4-se16    the same with the Super Expert's layer kept 16-bit (se_mode layer, in `ignore`)
  speed rows, in this process on the same windows, interleaved, best of ``--repeat``:
    bf16          the checkpoint
    rtn4-fused    the in-memory RTN model: stacked codes, one dequantize per MoE layer and forward
    rtn4-loop     the layout before: one QuantizedLinear per expert projection, a Python loop per expert
  peak memory: max RSS of a child process that loads the model and evaluates it once.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "evals" / "reference"))


def _disk(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _loop_model(model):
    """The per-expert layout quantized experts had before (one QuantizedLinear per projection)."""
    from secompress.adapters import get_adapter
    from secompress.layout import PROJ, PerExpertExperts
    from secompress.quant.api import QuantizedLinear
    from secompress.quant.fused import FusedQuantizedExperts

    ad = get_adapter(model.config)
    out = copy.deepcopy(model)
    for i in ad.moe_layer_indices(out):
        block = ad.block_of(ad.layers(out)[i])
        qe = ad.experts_of(block)
        if not isinstance(qe, FusedQuantizedExperts):
            continue
        codes = {e: {p: qe.qtensor(e, p) for p in PROJ} for e in range(qe.num_experts)}
        per = PerExpertExperts(qe.to_fused())
        for e, qts in codes.items():
            for p, qt in qts.items():
                setattr(per.per_expert[e], p, QuantizedLinear.from_linear(getattr(per.per_expert[e], p), qt))
        qe.release_fused()
        setattr(block, ad.experts, per)
    return out


def _time(model, ids, repeat: int, batch: int) -> float:
    from secompress.perplexity import mean_loss

    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        mean_loss(model, ids, batch)
        best = min(best, time.perf_counter() - t)
    return best


def _child_peak(args, variant: str) -> float:
    """Max RSS (MiB) of a fresh process that builds ``variant`` and evaluates it once."""
    cmd = [sys.executable, __file__, args.model, "--child", variant, "--group-size", str(args.group_size),
           "--eval-samples", str(args.eval_samples), "--seq-len", str(args.seq_len)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def _child(args) -> None:
    from accept import heldout_windows

    from secompress.checkpoints import load_model
    from secompress.perplexity import mean_loss
    from secompress.quant.api import QuantConfig, quantize_

    torch.set_num_threads(2)
    model = load_model(args.model, torch.bfloat16)
    if args.child != "bf16":
        quantize_(model, QuantConfig(bits=4, group_size=args.group_size, symmetric=True,
                                     protect_super_experts=False))
        if args.child == "rtn4-loop":
            model = _loop_model(model)
    mean_loss(model, heldout_windows(args.eval_samples, args.seq_len), 4)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "evals" / "reference" / "model"))
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-gptq", action="store_true")
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default="bench_ct.json")
    args = ap.parse_args()
    if args.child:
        return _child(args)
    from accept import heldout_windows

    import secompress
    from secompress.checkpoints import load_model, load_tokenizer
    from secompress.data import load_calibration
    from secompress.perplexity import perplexity
    from secompress.profile import ProfileConfig, profile
    from secompress.quant.api import QuantConfig, quantize_
    from secompress.quant.formats.ct import save_ct

    torch.set_num_threads(2)
    gs = args.group_size
    model, tok = load_model(args.model, torch.bfloat16), load_tokenizer(args.model)
    held = heldout_windows(args.eval_samples, args.seq_len)
    calib = load_calibration("builtin", tok, args.samples, args.seq_len)
    prof = profile(model, tok, data=calib, config=ProfileConfig(num_samples=args.samples, seq_len=args.seq_len),
                   progress=False)
    rows, speed = [], {}
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(Path(d) / "bf16")
        rows.append({"variant": "bf16", "disk_bytes": _disk(Path(d) / "bf16"), "perplexity": perplexity(model, held, 4)})
        rtn = copy.deepcopy(model)
        plan = quantize_(rtn, QuantConfig(bits=4, group_size=gs, symmetric=True, protect_super_experts=False))
        variants = [("rtn4", rtn, plan)]
        if not args.no_gptq:
            for label, protect in (("gptq4", False), ("gptq4-se16", True)):
                m = copy.deepcopy(model)
                cfg = QuantConfig(method="gptq", bits=4, group_size=gs, symmetric=True, se_mode="layer",
                                  protect_super_experts=protect, fallback="rtn")
                p = quantize_(m, cfg, profile=prof, tokenizer=tok, data=calib, work=Path(d) / f"work-{label}")
                variants.append((label, m, p))
        for label, m, p in variants:
            out = save_ct(m, tok, p, Path(d) / label)
            back = secompress.load(out)
            with torch.no_grad():
                ids = held[:1, :64]
                diff = float((back(ids).logits - m(ids).logits).abs().max() / m(ids).logits.abs().max())
            compat = json.loads((out / "quantization_plan.json").read_text())["compatibility"]
            rows.append({"variant": label, "disk_bytes": _disk(out), "perplexity": perplexity(back, held, 4),
                         "reload_rel_diff": diff, "avg_bits": p.avg_bits(),
                         "serves": {k: v["ok"] for k, v in compat.items()}})
        loop = _loop_model(rtn)
        models = {"bf16": model, "rtn4-fused": rtn, "rtn4-loop": loop}
        for label in models:
            _time(models[label], held[:2], 1, 2)  # warm-up
        times = {label: [] for label in models}
        for _ in range(args.repeat):  # interleaved: the machine's load changes while this runs
            for label, m in models.items():
                times[label].append(_time(m, held, 1, 4))
        for label in models:
            speed[label] = {"seconds": min(times[label]), "peak_rss_mib": _child_peak(args, label)}
    base = speed["bf16"]["seconds"]
    for v in speed.values():
        v["vs_bf16"] = v["seconds"] / base
    print(f"model {args.model}; SEs {prof.se_ids()}; group size {gs}; perplexity on the reference held-out "
          f"stream ({held.numel()} tokens); torch threads 2")
    print(f"{'variant':<12}{'disk MiB':>10}{'vs bf16':>9}{'ppl':>9}{'reload diff':>13}  serves")
    for r in rows:
        serves = ", ".join(k for k, ok in r.get("serves", {}).items() if ok)
        print(f"{r['variant']:<12}{r['disk_bytes'] / 2**20:>10.2f}{r['disk_bytes'] / rows[0]['disk_bytes']:>9.3f}"
              f"{r['perplexity']:>9.3f}{r.get('reload_rel_diff', 0):>13.1e}  {serves}")
    print(f"\n{'eval speed':<12}{'seconds':>9}{'vs bf16':>9}{'peak RSS MiB':>14}")
    for label, v in speed.items():
        print(f"{label:<12}{v['seconds']:>9.2f}{v['vs_bf16']:>9.2f}{v['peak_rss_mib']:>14.0f}")
    Path(args.out).write_text(json.dumps({"model": args.model, "super_experts": prof.se_ids(), "sizes": rows,
                                          "speed": speed}, indent=2) + "\n")


if __name__ == "__main__":
    main()
