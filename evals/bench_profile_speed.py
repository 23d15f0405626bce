"""Benchmark (not a test): the streamed profile against the forward it observes (issue 20).

    python evals/bench_profile_speed.py --shape olmoe --layers 8 [--dir /tmp/bench_speed] [--keep]

One run, on a random-weight checkpoint with real shapes (``evals/bench_scale.py``'s generator, one
Super Expert planted at layer 1 expert 5), measures in this order, each step alone, with its wall
time, the process's CPU seconds (user + system, all threads) and peak RSS (VmHWM reset per step):

  read       one read of the whole checkpoint: every shard read sequentially with O_DIRECT (the
             disk itself, not the page cache) into one 64 MiB buffer
  load       transformers ``AutoModelForCausalLM.from_pretrained(dtype=bfloat16)`` (with the process's
             file-backed RSS after it: weights left memory-mapped)
  touch      one read of every parameter page, so that no page fault of a lazily mapped weight is
             counted in the forward
  forward    a plain forward of the decoder stack over the calibration windows (no hooks; the
             model's default attention and experts implementations, named in the output), in
             chunks of ``--batch-size``, after a warm-up forward of one 8-token window
  hooked     ``secompress.profile`` on the loaded model (in memory: hooks, eager attention)
  streamed   ``secompress.profile(path, streaming=True)``: the same windows and batch size

Before ``read``, ``load`` and ``streamed`` the checkpoint's pages are dropped from the page cache
(``posix_fadvise(DONTNEED)``) and the fraction still cached is measured (``mincore``) and printed:
every step reads from the disk. It prints the ratios streamed / (forward + read) (goal <= 1.3)
and hooked / forward, checks that the streamed profile equals the in-memory one array by array
and finds the planted SE, and deletes the checkpoint unless ``--keep``.
The oneDNN kernel-cache capacities in effect (``secompress.native``) are printed: set
``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` / ``LRU_CACHE_CAPACITY`` in the environment to compare.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import SE_EXPERT, SE_LAYER, PeakRSS, config_of, generate, raw_read_gbps  # noqa: E402

_LIBC = ctypes.CDLL(None, use_errno=True)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def drop_cache(folder: Path) -> None:
    """Drop the checkpoint's clean pages from the page cache."""
    for f in shards(folder):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(folder: Path) -> float:
    """Fraction of the checkpoint's pages in the page cache (``mincore``)."""
    page = mmap.PAGESIZE
    total = resident = 0
    for f in shards(folder):
        size = f.stat().st_size
        with open(f, "rb") as h:
            m = mmap.mmap(h.fileno(), size, access=mmap.ACCESS_COPY)
            try:
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
                if _LIBC.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                    raise OSError(ctypes.get_errno(), "mincore")
                resident += sum(b & 1 for b in bytes(vec))
                total += n
                del addr
            finally:
                m.close()
    return resident / max(1, total)


def _rss_field(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


@torch.no_grad()
def touch(model) -> None:
    """Read one value per memory page of every parameter."""
    for p in model.parameters():
        p.view(-1)[:: 4096 // p.element_size()].float().sum()


class Step:
    """Wall time, CPU seconds and peak RSS (VmHWM) of the block."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        gc.collect()
        self._rss = PeakRSS(self.name).__enter__()
        self.t0, self.c0 = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.seconds, self.cpu = time.perf_counter() - self.t0, _cpu() - self.c0
        self._rss.__exit__(*exc)
        self.peak = self._rss.peak


def report(rows: list, step: Step, **kw) -> dict:
    d = {"step": step.name, "seconds": round(step.seconds, 2), "cpu_s": round(step.cpu, 1),
         "peak_rss_gib": round(step.peak / 2**30, 2), **kw}
    print(json.dumps(d), flush=True)
    rows.append(d)
    return d


@contextmanager
def cold(folder: Path, rows_kw: dict):
    drop_cache(folder)
    rows_kw["cached_before"] = round(cached_fraction(folder), 3)
    yield


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="olmoe", choices=("olmoe", "qwen15"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/bench_speed")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", default="read,load,forward,hooked,streamed")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    a = ap.parse_args()
    steps = set(a.steps.split(","))

    import secompress  # noqa: F401  (bounds oneDNN's caches before any matmul)
    from secompress.checkpoints import load_tokenizer
    from secompress.data import load_calibration
    from secompress.profile import ProfileConfig, profile

    src = Path(a.dir) / f"{a.shape}-{a.layers}"
    config = config_of(a.shape, a.layers)
    rows: list[dict] = []
    with Step("generate") as s:
        if not (src / "config.json").is_file():
            generate(src, config)
    size = sum(f.stat().st_size for f in shards(src))
    report(rows, s, checkpoint_gib=round(size / 2**30, 2), layers=a.layers)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "onednn": {k: os.environ.get(k) for k in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                                                                 "LRU_CACHE_CAPACITY")},
                      "load_avg": os.getloadavg()}), flush=True)
    tok = load_tokenizer(src)
    calib = load_calibration("builtin", tok, a.samples, a.seq_len)
    pcfg = dict(num_samples=a.samples, seq_len=a.seq_len, batch_size=a.batch_size, dtype="bfloat16")
    t: dict[str, float] = {}

    if "read" in steps:
        kw: dict = {}
        with cold(src, kw), Step("read") as s:
            hows = {raw_read_gbps(f, limit=1 << 62)[1] for f in shards(src)}
        t["read"] = s.seconds
        report(rows, s, gbps=round(size / s.seconds / 1e9, 3), read=",".join(sorted(hows)), **kw)

    model = None
    if steps & {"load", "forward", "hooked"}:
        from transformers import AutoModelForCausalLM

        kw = {}
        with cold(src, kw), Step("load") as s:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
        t["load"] = s.seconds
        report(rows, s, rss_file_gib=round(_rss_field("RssFile") / 2**30, 2), **kw)
        with Step("touch") as s:  # fault in pages from_pretrained left mapped but unread (none if it copied)
            touch(model)
        t["touch"] = s.seconds
        report(rows, s, rss_file_gib=round(_rss_field("RssFile") / 2**30, 2))

    if "forward" in steps:
        from secompress.adapters import get_adapter

        base = model.get_submodule(get_adapter(model.config).layers_path.rpartition(".")[0])
        impl = dict(attention=model.config._attn_implementation, experts=model.config._experts_implementation)
        with torch.no_grad():
            base(input_ids=calib.input_ids[:1, :8], use_cache=False)  # warm-up
            with Step("forward") as s:
                for ids in calib.input_ids.split(a.batch_size):
                    base(input_ids=ids, use_cache=False)
        t["forward"] = s.seconds
        report(rows, s, tokens=calib.num_tokens, **impl)
        del base

    hooked = None
    if "hooked" in steps:
        with Step("hooked") as s:
            hooked = profile(model, tok, data=calib, config=ProfileConfig(**pcfg), progress=False)
        t["hooked"] = s.seconds
        report(rows, s, super_experts=hooked.se_ids())
    del model
    gc.collect()

    streamed = None
    if "streamed" in steps:
        kw = {}
        with cold(src, kw), Step("streamed") as s:
            streamed = profile(str(src), tok, data=calib, config=ProfileConfig(**pcfg, streaming=True),
                               progress=False)
        t["streamed"] = s.seconds
        report(rows, s, super_experts=streamed.se_ids(), **kw)

    summary: dict = {"checkpoint_gib": round(size / 2**30, 2), "tokens": calib.num_tokens}
    if {"streamed", "forward", "read"} <= t.keys():
        summary["streamed/(forward+read)"] = round(t["streamed"] / (t["forward"] + t["read"]), 2)
        summary["goal"] = 1.3
    if {"hooked", "forward"} <= t.keys():
        summary["hooked/forward"] = round(t["hooked"] / t["forward"], 2)
    if hooked is not None and streamed is not None:
        diff = [k for k in hooked.arrays if not np.array_equal(hooked.arrays[k], streamed.arrays[k], equal_nan=True)]
        summary["streamed_equals_in_memory"] = not diff
        summary["differing_arrays"] = diff
    for r in (hooked, streamed):
        if r is not None:
            summary["planted_se_found"] = (SE_LAYER, SE_EXPERT) in r.se_ids()
    summary["load_avg_after"] = os.getloadavg()
    print(json.dumps({"summary": summary, "steps": rows}), flush=True)
    if not a.keep:
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
