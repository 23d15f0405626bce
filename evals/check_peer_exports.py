"""compressed-tensors checkpoints of the reference model written by llm-compressor 0.14 and by secompress:
does each one load with ``secompress.load``, profile and evaluate, and how far are its logits from the
original's? Also what transformers 5.24 (installed) and 5.17 (llm-compressor's environment) make of it.

    python evals/check_peer_exports.py [--work evals/out/peer] [--out evals/results/peer_exports.md] [--no-gptq]

Checkpoints (evals/reference/model, bf16; int4, symmetric unless said, group 128):
  ours-rtn4, ours-gptq4     secompress quantize (RTN; GPTQ through gptqmodel), every expert and Linear
  ours-rtn4-se16            secompress RTN with the Super Expert's layer 0 kept 16-bit (its experts in `ignore`)
  llmc-*                    evals/peer/export_reference.py (run here with --llmc-python when missing): RTN,
                            GPTQ with actorder "weight", layer 0's experts ignored, act-order g_idx (asymmetric)
Columns: ``secompress.load`` (what it returns; logits relative error ``||l - l0|| / ||l0||`` against the
original's on held-out windows, both in bf16), ``profile`` (the Super Experts found in memory / streamed;
the original's is layer 0 expert 3), ``evaluate`` (held-out perplexity in memory / streamed),
``= ct dequantizer`` (largest difference between secompress's weights and compressed-tensors' own
model-free dequantizer), then transformers' own ``from_pretrained`` (logits error or what it raised).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "evals" / "reference")]
REFERENCE = ROOT / "evals" / "reference" / "model"
LLMC = ("llmc-rtn-w4g128", "llmc-gptq-w4g128-actorder", "llmc-ignore-layer0", "llmc-gidx-w4g128-asym")


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def ours(work: Path, gptq: bool) -> list[str]:
    """secompress's own exports of the reference model (skipped when present)."""
    from secompress.checkpoints import load_model, load_tokenizer
    from secompress.data import load_calibration
    from secompress.profile import ProfileConfig, profile
    from secompress.quant.api import QuantConfig, quantize_
    from secompress.quant.compressed_tensors import save_ct

    todo = {"ours-rtn4": dict(protect_super_experts=False), "ours-rtn4-se16": dict(se_mode="layer")}
    if gptq:
        todo["ours-gptq4"] = dict(method="gptq", protect_super_experts=False, se_mode="layer", fallback="rtn")
    if all((work / n).is_dir() for n in todo):
        return list(todo)
    model, tok = load_model(REFERENCE), load_tokenizer(REFERENCE)
    calib = load_calibration("builtin", tok, 16, 256)
    prof = profile(model, tok, data=calib, config=ProfileConfig(num_samples=16, seq_len=256), progress=False)
    for name, kw in todo.items():
        if (work / name).is_dir():
            continue
        m = copy.deepcopy(model)
        plan = quantize_(m, QuantConfig(bits=4, group_size=128, symmetric=True, **kw), profile=prof, tokenizer=tok,
                         data=calib, work=work / f"gptq-work-{name}")
        save_ct(m, tok, plan, work / name)
    return list(todo)


def dequantizer_gap(path: Path) -> float | None:
    """Largest |secompress's weight - CompressedTensorsDequantizer's| (None: the dequantizer cannot read it or
    the config has several groups, which it resolves in file order; see tests/test_peer_exports.py)."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    from secompress.streaming import Checkpoint

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    if len(qc["config_groups"]) > 1:
        return None
    try:
        theirs = CompressedTensorsDequantizer(path, dtype=torch.float32).process(load_file(path / "model.safetensors"))
    except Exception:
        return None
    ckpt = Checkpoint(path)
    with ckpt.reading():
        return max(float((ckpt.get(k).float() - theirs[k]).abs().max()) for k in ckpt.ct.weights)


def check(path: Path, ids: torch.Tensor, ref: torch.Tensor, held: torch.Tensor) -> dict:
    import secompress
    from secompress.checkpoints import load_model
    from secompress.perplexity import mean_loss
    from secompress.profile import ProfileConfig, profile
    from secompress.quant.fused import FusedQuantizedExperts
    from secompress.compress import Job, plan_job, run_job
    from secompress.pipeline import Streamed
    from secompress.source import Source

    row: dict = {}
    try:
        m = secompress.load(path)
        kind = "integer codes" if any(isinstance(x, FusedQuantizedExperts) for x in m.modules()) else "dequantized"
        row["load"] = {"ok": True, "kind": kind, "rel_err": _rel(_logits(m, ids), ref)}
    except Exception as e:
        row["load"] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    try:
        pc = dict(num_samples=16, seq_len=256, batch_size=4)
        row["profile"] = {s: profile(path, config=ProfileConfig(**pc, streaming=s == "streamed"), progress=False
                                     ).se_ids() for s in ("memory", "streamed")}
    except Exception as e:
        row["profile"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    try:
        mem = math.exp(mean_loss(load_model(path), held, 4))
        source = Source.open(path, dtype=torch.bfloat16, device="cpu")
        st = run_job(plan_job(source, Job(batch_size=4)), Streamed(source), held, progress=False).perplexity_before
        row["evaluate"] = {"memory": mem, "streamed": st}
    except Exception as e:
        row["evaluate"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    row["ct_dequantizer_gap"] = dequantizer_gap(path)
    try:
        from transformers import AutoModelForCausalLM

        t = AutoModelForCausalLM.from_pretrained(path).eval()
        row["transformers_5.24"] = {"rel_err": _rel(_logits(t, ids), ref)}
    except Exception as e:
        row["transformers_5.24"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    return row


def _cpu() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return name


def _cell_load(r: dict) -> str:
    x = r["load"]
    return f"yes, {x['kind']}, {x['rel_err']:.4f}" if x["ok"] else f"**no**: {x['error']}"


def _cell_tf(x: dict, ours: float | None) -> str:
    """transformers' outcome; a load whose logits are > 3x further from the original's than secompress's
    reading of the same files is flagged: it loaded without an error, with wrong (re-initialised) weights."""
    if "rel_err" in x:
        wrong = ours is not None and x["rel_err"] > 3 * ours
        return f"loads, {x['rel_err']:.4f}" + (" **wrong, no error: experts re-initialised**" if wrong else "")
    return "refuses: " + x["error"].split(":")[0]


def markdown(rows: dict, meta: dict) -> str:
    out = [f"# compressed-tensors exports of other tools, read by secompress ({meta['date']})", "",
           f"Model: evals/reference/model (Qwen3-MoE, 6 layers, 16 experts, hidden 256, expert width 128, bf16; Super "
           f"Expert at layer 0 expert 3). Logits: {meta['logit_tokens']} held-out tokens, relative error "
           "||l - l0|| / ||l0|| against the original's, bf16 compute. Perplexity: "
           f"{meta['eval_tokens']} held-out tokens (original: {meta['ppl_original']:.4f}). Profile: 16 builtin "
           f"calibration windows of 256. Machine: {meta['machine']}; torch {meta['torch']}, transformers "
           f"{meta['transformers']}, compressed-tensors {meta['compressed_tensors']}; llm-compressor exports made with "
           f"{meta['llmc']}. Made by evals/check_peer_exports.py in {meta['seconds']:.0f} s.", "",
           "| checkpoint | secompress.load (returns, logits error) | profile SEs (memory / streamed) | evaluate ppl "
           "(memory / streamed) | = ct dequantizer | transformers 5.24 | transformers 5.17 |",
           "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        prof = r["profile"]
        ses = lambda v: ", ".join(f"({l}, {e})" for l, e in v) or "none"  # noqa: E731
        pcell = f"{ses(prof['memory'])} / {ses(prof['streamed'])}" if "error" not in prof else \
            f"**no**: {prof['error']}"
        ev = r["evaluate"]
        ecell = f"{ev['memory']:.4f} / {ev['streamed']:.4f}" if "error" not in ev else f"**no**: {ev['error']}"
        gap = r["ct_dequantizer_gap"]
        gcell = "n/a" if gap is None else ("0 (bit-identical)" if gap == 0 else f"{gap:.2e}")
        ours = r["load"].get("rel_err")
        out.append(f"| {name} | {_cell_load(r)} | {pcell} | {ecell} | {gcell} | "
                   f"{_cell_tf(r['transformers_5.24'], ours)} | "
                   f"{_cell_tf(r.get('transformers_5.17', {'error': 'not run'}), ours)} |")
    out += ["", "n/a in `= ct dequantizer`: compressed-tensors 0.20's model-free `CompressedTensorsDequantizer` cannot "
            "read the checkpoint (act-order `actorder: group` is refused by its config parser) or it holds several "
            "config groups (it resolves them in file order, not by compressed-tensors' own precedence)."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "evals" / "out" / "peer"))
    ap.add_argument("--out", default=str(ROOT / "evals" / "results" / "peer_exports.md"))
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python")
    ap.add_argument("--no-gptq", action="store_true")
    ap.add_argument("--render", action="store_true", help="only rewrite --out from WORK/peer_exports.json")
    args = ap.parse_args()
    if args.render:
        saved = json.loads((Path(args.work) / "peer_exports.json").read_text())
        Path(args.out).write_text(markdown(saved["rows"], saved["meta"]))
        return print(Path(args.out).read_text())
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    if not all((work / n).is_dir() for n in LLMC):
        subprocess.run([args.llmc_python, str(ROOT / "evals" / "peer" / "export_reference.py"), "export", str(work)],
                       check=True, env=env)
    names = ours(work, not args.no_gptq) + list(LLMC)

    from accept import heldout_windows

    from secompress.checkpoints import load_model
    from secompress.perplexity import mean_loss

    ids = heldout_windows(4, 128)  # [4, 128] logits
    held = heldout_windows(16, 256, offset=4 * 127)  # [16, 256] perplexity
    original = load_model(REFERENCE)
    ref = _logits(original, ids)
    torch.save(ids, work / "ids.pt")
    subprocess.run([args.llmc_python, str(ROOT / "evals" / "peer" / "export_reference.py"), "logits",
                    str(work / "ids.pt"), str(work / "tf517.json"), *[str(work / n) for n in names]], check=True,
                   env=env, capture_output=True)
    tf517 = json.loads((work / "tf517.json").read_text())
    rows = {}
    for n in names:
        rows[n] = check(work / n, ids, ref, held)
        rows[n]["transformers_5.17"] = tf517.get(n, {"error": "not run"})
        print(n, json.dumps(rows[n]), flush=True)
    import compressed_tensors
    import transformers

    made = json.loads((ROOT / "tests" / "fixtures" / "peer" / "manifest.json").read_text())["made_with"]
    meta = {"date": time.strftime("%Y-%m-%d"), "logit_tokens": ids.numel(), "eval_tokens": held.numel(),
            "ppl_original": math.exp(mean_loss(original, held, 4)),
            "machine": f"{_cpu()}, 2 torch threads",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "llmc": f"llm-compressor {made['llmcompressor']} (transformers {made['transformers']}, compressed-tensors "
                    f"{made['compressed_tensors']})", "seconds": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown(rows, meta))
    (work / "peer_exports.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
