"""Benchmark (not a test): the full recipe on checkpoints with the real shapes of OLMoE-1B-7B and
Qwen1.5-MoE-A2.7B, random weights, larger than (or close to) this machine's memory.

    python evals/bench_scale.py --shape olmoe --dir /work/scale [--layers N] [--mode streamed|memory]
    python evals/bench_scale.py --shape qwen15 --dir /work/scale

Steps, each timed with its peak resident memory (the kernel's high-water mark VmHWM, reset per step):
  generate  the checkpoint written shard by shard from random weights (never the whole model in
            memory); one Super Expert planted in layer 1 by scaling one down_proj channel
  profile   streamed SE profile (secompress.profile(..., streaming=True))
  compress  one streamed pass: baseline perplexity, prune 25% REAP, RTN 4-bit (group 128, symmetric)
            with the SE's layer kept 16-bit (se_mode layer), export (--format, default
            compressed-tensors, written layer by layer), perplexity of the compressed model
  unaware   the SE-unaware pass (protection off), a second streamed pass, never a deep copy:
            perplexity, and (compressed-tensors) its all-4-bit export, which stock transformers loads
  checks    the planted SE bit-identical in the export; stock transformers loads an export on the
            meta device with no missing/unexpected keys (compressed-tensors: the unaware export, since
            transformers 5.24 cannot load a 16-bit layer in `ignore`; dequantized: the export itself);
            spot checks: the embeddings equal, one packed expert dequantized by
            compressed-tensors' own unpacker within RTN's bound of the original
  disk      raw read throughput of one shard (O_DIRECT where allowed) vs the engine's read throughput
``--mode memory`` runs the same job over the model loaded in memory (a resident layer source instead of
the streamed one) for the side-by-side figure (only for cuts that fit). Prints one JSON line per step and a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "olmoe": dict(model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                  num_experts=64, num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=16,
                  vocab_size=50304, max_position_embeddings=4096, tie_word_embeddings=False),
    "qwen15": dict(model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                   num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                   shared_expert_intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
                   vocab_size=151936, max_position_embeddings=8192, tie_word_embeddings=False),
}
SE_LAYER, SE_EXPERT, SE_CHANNEL, SE_SCALE = 1, 5, 7, 300.0


class PeakRSS:
    """Peak resident memory of this process inside the block: the kernel's high-water mark (VmHWM), reset on
    entry (``/proc/self/clear_refs``), so a spike between two samples counts too. A thread samples VmRSS every
    0.1 s: above ``CAP`` bytes (``--rss-cap-gib``) the process reports the step as killed and exits 137, as an
    OOM kill would, before the machine swaps."""

    CAP: int | None = None
    step = ""

    def __init__(self, step: str = ""):
        self.step = step

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.peak, self._stop, self._t0 = _rss(), False, time.perf_counter()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            if self.CAP is not None and self.peak > self.CAP:
                report(self.step, time.perf_counter() - self._t0, self.peak, killed=f"RSS over the {self.CAP / 2**30:.0f} GiB cap")
                os._exit(137)
            time.sleep(0.1)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _rss("VmHWM"))


def _rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def report(step: str, seconds: float, peak: int, **kw) -> dict:
    d = {"step": step, "seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 2), **kw}
    print(json.dumps(d), flush=True)
    return d


def config_of(shape: str, layers: int | None):
    from transformers import AutoConfig

    from secompress.bytetok import BOS_ID, EOS_ID, PAD_ID

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    mt = kw.pop("model_type")
    return AutoConfig.for_model(mt, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **kw)


@torch.no_grad()
def generate(folder: Path, config) -> str:
    """Random bf16 weights written tensor by tensor into <= 5 GB shards; returns the SE's key."""
    from secompress.bytetok import build_byte_tokenizer
    from secompress.checkpoints import as_saved
    from secompress.shards import ShardWriter, specs_of
    from secompress.streaming import build_skeleton

    folder.mkdir(parents=True, exist_ok=True)
    model = build_skeleton(config)
    sd = {k: torch.empty_like(v, dtype=torch.bfloat16, device="meta") for k, v in model.state_dict().items()}
    specs = specs_of(as_saved(model, sd))
    w = ShardWriter(folder, specs)
    g = torch.Generator().manual_seed(0)
    se_key = f"model.layers.{SE_LAYER}.mlp.experts.{SE_EXPERT}.down_proj.weight"
    P = 1 << 24  # a pool of N(0, std) values; each tensor copies pieces from random offsets (cheap on 2 cores)
    pool = (torch.randn(2 * P, generator=g) * config.initializer_range).to(torch.bfloat16)
    for s in specs:
        if s.name.endswith("norm.weight") or "layernorm" in s.name:
            t = torch.ones(s.shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(s.shape, dtype=torch.bfloat16)
            flat = t.view(-1)
            for pos in range(0, flat.numel(), P):
                k = min(P, flat.numel() - pos)
                off = int(torch.randint(0, P, (1,), generator=g))
                flat[pos:pos + k].copy_(pool[off:off + k])
        if s.name == se_key:
            t[SE_CHANNEL, :] *= SE_SCALE  # [H, I]: one output channel -> a massive activation
        w.write(s.name, t)
        del t
    w.close()
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return se_key


def raw_read_gbps(path: Path, limit: int = 4 * 2**30) -> tuple[float, str]:
    """Sequential read of a file with O_DIRECT (the disk itself, not the page cache) where the file
    system allows it, else a plain read (an upper bound when the file is cached); (GB/s, how)."""
    import mmap

    buf = mmap.mmap(-1, 64 * 2**20)  # page-aligned, as O_DIRECT needs
    try:
        fd, how = os.open(path, os.O_RDONLY | os.O_DIRECT), "O_DIRECT"
    except OSError:
        fd, how = os.open(path, os.O_RDONLY), "buffered (page cache not bypassed)"
    n, t0 = 0, time.perf_counter()
    try:
        while n < limit:
            k = os.readv(fd, [buf])
            if not k:
                break
            n += k
    finally:
        os.close(fd)
    return n / (time.perf_counter() - t0) / 1e9, how


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--dir", default="/work/scale")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    ap.add_argument("--mode", choices=("streamed", "memory"), default="streamed")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--keep", action="store_true", help="keep the export")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--no-unaware", action="store_true", help="skip the SE-unaware pass")
    ap.add_argument("--rss-cap-gib", type=float, default=None, help="stop a step whose peak RSS passes this")
    ap.add_argument("--format", choices=("compressed-tensors", "dequantized"), default="compressed-tensors")
    a = ap.parse_args()
    PeakRSS.CAP = None if a.rss_cap_gib is None else int(a.rss_cap_gib * 2**30)

    from secompress.checkpoints import load_tokenizer
    from secompress.data import CalibrationData, load_calibration
    from secompress.profile import ProfileConfig, profile
    from secompress.prune import PruneConfig
    from secompress.compress import Job, plan_job, run_job
    from secompress.pipeline import Resident, Streamed
    from secompress.quant.api import QuantConfig
    from secompress.source import Source

    base = Path(a.dir) / f"{a.shape}-{a.layers or 'full'}"
    src, out = base / "input", base / f"export-{a.mode}"
    config = config_of(a.shape, a.layers)
    results = []
    with PeakRSS() as p:
        t0 = time.perf_counter()
        if not (src / "config.json").is_file():
            generate(src, config)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    results.append(report("generate", time.perf_counter() - t0, p.peak, checkpoint_gb=round(size / 1e9, 2),
                          layers=config.num_hidden_layers))
    se_key = f"model.layers.{SE_LAYER}.mlp.experts.{SE_EXPERT}.down_proj.weight"
    if a.generate_only:
        return

    tok = load_tokenizer(src)
    both = load_calibration("builtin", tok, a.samples + a.eval_samples, a.seq_len)
    calib = CalibrationData(both.input_ids[: a.samples], both.source, both.sha256)
    eval_ids = both.input_ids[a.samples:]
    pc = PruneConfig(ratio=0.25, method="reap", eval_samples=0)
    qc = QuantConfig(bits=4, group_size=128, symmetric=True, se_mode="layer", se_bits=None, format=a.format)
    ct = a.format == "compressed-tensors"
    out_u = base / "export-unaware"

    with PeakRSS() as p:
        t0 = time.perf_counter()
        prof = profile(str(src), tok, data=calib, config=ProfileConfig(num_samples=a.samples, seq_len=a.seq_len,
                       batch_size=4, streaming=True, dtype="bfloat16"), progress=True)
    results.append(report("profile", time.perf_counter() - t0, p.peak, super_experts=prof.se_ids()))

    source = Source.open(src, dtype="bfloat16", device="cpu")
    job = Job(prune=pc, quant=qc, batch_size=4)
    streamed = a.mode == "streamed"
    step = "compress+export+ppl" + ("" if streamed else " (in memory)")
    with PeakRSS(step) as p:
        t0 = time.perf_counter()
        plan = plan_job(source, job, prof)
        print(plan.describe(*eval_ids.shape, streamed=streamed), flush=True)
        layers = Streamed(source) if streamed else Resident(source.load())  # the same job over either source
        res = run_job(plan, layers, eval_ids, out, tok, overwrite=True, progress=True)
        del layers
        dt = time.perf_counter() - t0
    results.append(report(step, dt, p.peak, estimated_peak_gib=round(plan.peak_bytes(*eval_ids.shape) / 2**30, 2),
                          ppl_before=res.perplexity_before, ppl_after=res.perplexity_after,
                          read_gbps=round(size / dt / 1e9, 3), layer_gib=round(plan.layer_bytes / 2**30, 3),
                          rest_gib=round(plan.rest_bytes / 2**30, 3)))
    if streamed and not a.no_unaware:
        with PeakRSS() as p:
            t0 = time.perf_counter()
            plan_u = plan_job(source, job, prof, protect=False)
            res_u = run_job(plan_u, Streamed(source), eval_ids, out_u if ct else None, tok, baseline=False,
                            overwrite=True, progress=True)
        results.append(report("se_unaware_pass", time.perf_counter() - t0, p.peak,
                              ppl_after=res_u.perplexity_after, export=bool(ct)))
    kept = plan.mplan.kept

    # checks on the export
    from transformers import AutoModelForCausalLM

    from secompress.streaming import Checkpoint

    new_e = kept[SE_LAYER].index(SE_EXPERT)
    ck_in, ck_out = Checkpoint(src), Checkpoint(out, raw=ct)  # raw: the packed codes as stored
    with ck_in.reading(), ck_out.reading():
        se_in = ck_in.get(se_key)
        out_key = se_key.replace(f"experts.{SE_EXPERT}.", f"experts.{new_e}.")
        # not stored 16-bit when the profile missed the planted SE (too few calibration tokens reach it)
        se_identical = bool(torch.equal(se_in, ck_out.get(out_key))) if out_key in ck_out.where else "quantized"
        k_emb = "model.embed_tokens.weight"  # a 16-bit tensor outside the layers
        err = float((ck_in.get(k_emb).float() - ck_out.get(k_emb).float()).abs().max())
    stock = out if not ct else out_u if out_u.is_dir() else None  # in-memory mode writes no unaware export
    info, experts_after = {"missing_keys": [], "unexpected_keys": []}, None
    stock_peak = 0
    if stock is not None:
        with PeakRSS() as p:  # transformers' own loading, not secompress's
            m, info = AutoModelForCausalLM.from_pretrained(stock, device_map="meta", output_loading_info=True)
            experts_after = m.config.num_experts
            del m
        stock_peak = p.peak
    extra = {}
    if ct:  # one packed expert of the last layer through compressed-tensors' own unpacker
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        L = config.num_hidden_layers - 1
        e_new = 0
        name = f"model.layers.{L}.mlp.experts.{e_new}.down_proj"
        with ck_out.reading(), ck_in.reading():
            shape = torch.Size(ck_out.get(f"{name}.weight_shape").tolist())
            q = unpack_from_int32(ck_out.get(f"{name}.weight_packed"), 4, shape).float()  # [O, In] signed codes
            s_ = ck_out.get(f"{name}.weight_scale").float()  # [O, G]
            w_hat = (q.reshape(shape[0], s_.shape[1], -1) * s_[..., None]).reshape(shape)
            w = ck_in.get(f"model.layers.{L}.mlp.experts.{kept[L][e_new]}.down_proj.weight").float()
        extra = {"packed_expert_max_err": float((w - w_hat).abs().max()), "rtn_bound": float(s_.max() / 2)}
    results.append(report("checks", 0, _rss(), stock_load_peak_gib=round(stock_peak / 2**30, 2), se_bit_identical=se_identical, stock_loaded=stock and stock.name,
                          missing=len(info["missing_keys"]), unexpected=len(info["unexpected_keys"]),
                          experts_after=experts_after, embed_max_abs_err=err, **extra))
    shard = max(src.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    gbps, how = raw_read_gbps(shard)
    results.append(report("disk", 0, _rss(), raw_read_gbps=round(gbps, 3), read=how))
    print(json.dumps({"summary": results}))  # (ru_maxrss is not reported: the per-step VmHWM resets change it)
    if not a.keep:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out_u, ignore_errors=True)


if __name__ == "__main__":
    main()
