"""Diagnostic (not a test): resident memory after every per-layer step of one streamed pass, to tell a
per-layer leak (RSS rising with depth) from a within-layer peak.

    python evals/trace_rss.py CHECKPOINT                 # a plain pass (no callbacks): the loop alone
    python evals/trace_rss.py CHECKPOINT --compress      # REAP 25% + RTN4 (SE layer 16-bit) + CT export
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 LRU_CACHE_CAPACITY=1024 python evals/trace_rss.py CKPT  # torch's defaults

Prints RssAnon (anonymous resident memory) each time the engine hands freed memory back (after each
callback and after each layer), then the process's high-water mark. This is how the ~100 MB per layer
of oneDNN's kernel caches was found (secompress/native.py, evals/results/bench_scale.txt). Run it on a
cut of a big checkpoint: ``python evals/bench_scale.py --shape qwen15 --layers 6 --generate-only``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--compress", action="store_true", help="the bench_scale recipe's SE-aware pass, no baseline")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()

    import secompress.pipeline.driver as driver
    from secompress.checkpoints import load_tokenizer
    from secompress.data import load_calibration
    from secompress.pipeline import Stream, Streamed
    from secompress.source import Source

    steps = [0]
    trim = driver._return_freed_memory

    def traced() -> None:
        trim()
        steps[0] += 1
        print(f"step {steps[0]:4d}: RssAnon {status('RssAnon'):7.0f} MiB", flush=True)

    driver._return_freed_memory = traced  # the loop calls it after each step and each layer
    tok = load_tokenizer(a.checkpoint)
    ids = load_calibration("builtin", tok, a.samples, a.seq_len).input_ids  # [N, S]
    print(f"start: RssAnon {status('RssAnon'):.0f} MiB", flush=True)
    if not a.compress:
        src = Streamed(Source.open(a.checkpoint, dtype="bfloat16", device="cpu"))
        src.run({"calib": Stream(list(ids.split(4)), before=True)}, progress=False)
        del src
    else:
        from secompress.data import CalibrationData
        from secompress.profile import ProfileConfig, profile
        from secompress.prune import PruneConfig
        from secompress.quant.api import QuantConfig
        from secompress.compress import Job, plan_job, run_job

        calib = CalibrationData(ids, "builtin", "")
        prof = profile(a.checkpoint, tok, data=calib, progress=False, config=ProfileConfig(
            num_samples=a.samples, seq_len=a.seq_len, batch_size=4, streaming=True, dtype="bfloat16"))
        print(f"after profile: RssAnon {status('RssAnon'):.0f} MiB", flush=True)
        job = Job(prune=PruneConfig(ratio=0.25, method="reap", eval_samples=0),
                  quant=QuantConfig(bits=4, group_size=128, symmetric=True, se_mode="layer", se_bits=None), batch_size=4)
        source = Source.open(a.checkpoint, dtype="bfloat16", device="cpu")
        with tempfile.TemporaryDirectory() as tmp:
            run_job(plan_job(source, job, prof), Streamed(source), ids[: max(1, a.samples // 2)], Path(tmp) / "out",
                    tok, baseline=False, progress=False)
    print(f"end: RssAnon {status('RssAnon'):.0f} MiB; peak (VmHWM) {status('VmHWM'):.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
