"""Benchmark of the profiler (not a test): overhead of hooks and memory of streaming.

    python evals/bench_profile.py [--model evals/reference/model] [--quick]

Prints, each measured in this one run:
  1. hooked profiling / plain forward, over the same calibration batches (goal <= 1.10x);
  2. peak RSS of streaming vs in-memory profiling for synthetic Qwen3-MoE checkpoints of
     8 and 16 layers, in units of one decoder layer's bytes (goal: <= 2 layers + embeddings,
     flat in depth).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def overhead(model_path: str | None, reps: int) -> None:
    from secompress.adapters import get_adapter
    from secompress.bytetok import build_byte_tokenizer
    from secompress.data import load_calibration
    from secompress.instrument import Recorder, instrument
    from secompress.checkpoints import load_model, load_tokenizer
    from secompress.testing import make_tiny

    if model_path:
        model, tok = load_model(model_path), load_tokenizer(model_path)
    else:
        model, tok = make_tiny("qwen3_moe", hidden_size=256, moe_intermediate_size=128, num_experts=16,
                               num_hidden_layers=6), build_byte_tokenizer()
    ad = get_adapter(model.config)
    data = load_calibration("builtin", tok, num_samples=16, seq_len=512)
    chunks = list(data.input_ids.split(8))
    base = model.get_submodule(ad.layers_path.rpartition(".")[0])

    def run():
        t = time.perf_counter()
        with torch.no_grad():
            for ids in chunks:
                base(input_ids=ids, use_cache=False)
        return time.perf_counter() - t

    default_impl = model.config._experts_implementation
    run()  # warm-up
    times = {"plain": [], "plain-eager": [], "hooked": []}
    for _ in range(reps):  # interleaved, so drift hits all equally
        times["plain"].append(run())
        model.set_experts_implementation("eager")
        times["plain-eager"].append(run())
        model.set_experts_implementation(default_impl)
        with instrument(model, ad, Recorder(seq_len=512)):
            times["hooked"].append(run())
    p, pe, h = (min(times[k]) for k in ("plain", "plain-eager", "hooked"))
    print(f"[overhead] model={model_path or 'synthetic qwen3_moe 6x16'} tokens={data.num_tokens} "
          f"attn={model.config._attn_implementation} (best of {reps})")
    print(f"[overhead] plain forward ({default_impl} experts) {p:.3f}s, plain forward (eager experts) {pe:.3f}s, "
          f"hooked profiling {h:.3f}s")
    print(f"[overhead] hooked/plain {h / p:.3f}x  hooked/plain-eager {h / pe:.3f}x  (goal <= 1.10x)")


def _make_synthetic(path: Path, layers: int) -> int:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from secompress.bytetok import build_byte_tokenizer

    cfg = Qwen3MoeConfig(vocab_size=259, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                         num_experts=32, num_experts_per_tok=4, bos_token_id=256, eos_token_id=257,
                         tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(cfg)
    model.save_pretrained(path, max_shard_size="100MB")
    build_byte_tokenizer().save_pretrained(path)
    return sum(p.numel() * 4 for p in model.model.layers[0].parameters())


def _vm_hwm() -> int:
    """Peak RSS of this process image (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_child(path: str, streaming: bool) -> None:
    from secompress import ProfileConfig, profile

    profile(path, config=ProfileConfig(num_samples=4, seq_len=256, batch_size=4, streaming=streaming,
                                       attention=False), progress=False)
    print(json.dumps({"peak_rss": _vm_hwm()}))


def _baseline_child(path: str) -> None:
    """Framework overhead: imports plus the weightless (meta) skeleton of the same model."""
    from secompress.checkpoints import load_config
    from secompress.streaming import build_skeleton

    build_skeleton(load_config(path))
    print(json.dumps({"peak_rss": _vm_hwm()}))


def _child(*args: str) -> int:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss"]


def memory(depths: list[int]) -> None:
    with tempfile.TemporaryDirectory() as d:
        for L in depths:
            path = Path(d) / f"L{L}"
            layer_bytes = _make_synthetic(path, L)
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            base = _child("--baseline", str(path))
            s = _child("--peak", str(path), "1") - base
            print(f"[memory] raw: baseline {base / 2**20:.1f} MiB (imports + meta skeleton)")
            m = _child("--peak", str(path), "0") - base
            print(f"[memory] layers={L:>2} checkpoint={size / 2**20:7.1f} MiB  layer={layer_bytes / 2**20:5.1f} MiB  "
                  f"streaming peak={s / 2**20:7.1f} MiB ({s / layer_bytes:4.2f} layers)  "
                  f"in-memory peak={m / 2**20:7.1f} MiB ({m / layer_bytes:5.2f} layers)  "
                  f"streaming/in-memory={s / m:.2f}")


def main() -> None:
    if sys.argv[1:2] == ["--peak"]:
        return _peak_child(sys.argv[2], sys.argv[3] == "1")
    if sys.argv[1:2] == ["--baseline"]:
        return _baseline_child(sys.argv[2])
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint for the overhead benchmark (default: synthetic)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    overhead(args.model, reps=2 if args.quick else 5)
    memory([8] if args.quick else [8, 16])


if __name__ == "__main__":
    main()
