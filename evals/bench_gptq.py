"""GPTQ on the bundled reference model: secompress (in process, layer by layer) vs llm-compressor 0.14.

    python evals/bench_gptq.py [--samples 32] [--seq-len 512] [--batch-size 4] [--eval-samples 16] [--reps 2]
                               [--llmc-python /work/venvs/llmc/bin/python] [--out evals/results/bench_gptq_reference]

Both tools get: evals/reference/model in float32; the same calibration windows (the built-in text,
--samples x --seq-len tokens, tokenized once here); all-expert calibration (secompress:
``calibration: all-experts``; llm-compressor: ``oneshot(moe_calibrate_all_experts=True)``, its
default, after it linearizes the fused experts); symmetric 4-bit integers, group 32, no
act-order, damp 0.01, blocks of 128 columns; every Linear of the decoder layers quantized
(attention, routed experts), ``lm_head`` and the routers not; Super Experts not protected (a
like-for-like run); --batch-size windows per forward; layer by layer with the calibration
propagated through the quantized layers (llm-compressor's sequential pipeline, its default for
GPTQ). Each tool runs in a child process (this file with --child; llm-compressor in its own venv).

Measured by this parent for each child's process tree: peak RSS (the child's and its
descendants' RSS summed, sampled every 20 ms; and the child's kernel high-water mark VmHWM) and
CPU seconds (user + sys of the child and its reaped descendants, from ``os.wait4``). Each child
also records CPU seconds and VmHWM at the end of each phase (import, load, GPTQ, perplexity): the
"GPTQ run" columns are the child up to the end of GPTQ, the "with eval" ones the whole child.
Perplexity: one function (below) on the same held-out windows (the reference model's held-out
stream) right after GPTQ, on llm-compressor's fake-quantized model and on secompress's
integer-coded modules. Runs are interleaved (--reps); the table shows each tool's best run. Both children run with
--threads intra-op threads and ``OMP_WAIT_POLICY=PASSIVE`` (--omp-wait-policy): on this shared
machine libgomp's default spinning made the same secompress run cost 17 CPU s instead of 1.3.
Goal: secompress <= llm-compressor on peak RSS and CPU seconds, perplexity within 0.5%.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "evals" / "reference" / "model"
LLMC_PYTHON = "/work/venvs/llmc/bin/python"
BITS, GROUP, DAMP, BLOCK = 4, 32, 0.01, 128


# ---- shared by both children (stdlib + torch only: the llm-compressor venv has no secompress) ----------
@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int) -> float:
    """exp(mean next-token cross-entropy) over the windows ``ids`` [N, S]."""
    total, count = 0.0, 0
    for chunk in ids.split(batch):
        logits = model(input_ids=chunk).logits.float()  # [B, S, V]
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         chunk[:, 1:].reshape(-1), reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


class Phases:
    """CPU seconds (user + sys) and the kernel's RSS high-water mark at the end of each phase."""

    def __init__(self):
        self.rows, self.t0 = [], time.perf_counter()

    def mark(self, name: str) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
        self.rows.append({"phase": name, "cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": time.perf_counter() - self.t0,
                          "vmhwm_mib": hwm / 1024})


def child_llmc(job: dict, ph: Phases) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    ph.mark("import")
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    ph.mark("load")
    ids = job["calib"]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=BITS, type="int", symmetric=True, strategy="group", group_size=GROUP))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*mlp.gate$"], actorder=None,
                          block_size=BLOCK, dampening_frac=DAMP)
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], batch_size=job["batch_size"], shuffle_calibration_samples=False,
            moe_calibrate_all_experts=True)
    ph.mark("gptq")
    quantized = sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)
    ppl = perplexity(model, job["held"], job["batch_size"])
    ph.mark("perplexity")
    return {"perplexity": ppl, "quantized_modules": quantized}


def child_secompress(job: dict, ph: Phases) -> dict:
    sys.path.insert(0, str(ROOT))
    from secompress.checkpoints import load_model
    from secompress.data import CalibrationData
    from secompress.quant.api import QuantConfig, quantize_
    from secompress.quant.backends.gptq import GptqOptions

    ph.mark("import")
    model = load_model(job["model"], torch.float32)
    ph.mark("load")
    cfg = QuantConfig(method="gptq", bits=BITS, group_size=GROUP, symmetric=True, protect_super_experts=False,
                      calibration="all-experts",
                      options=GptqOptions(batch_size=job["batch_size"], damp=DAMP, block_size=BLOCK))
    plan = quantize_(model, cfg, data=CalibrationData(job["calib"], "builtin", ""))
    ph.mark("gptq")
    quantized = sum(3 if u.expert is not None else 1  # an expert: gate, up, down (llm-compressor's Linear)
                    for n, u in plan.units.items() if plan.bits[n] is not None)
    ppl = perplexity(model, job["held"], job["batch_size"])
    ph.mark("perplexity")
    return {"perplexity": ppl, "quantized_modules": quantized}


def child_main(tool: str, job_path: str, out_path: str) -> None:
    ph = Phases()
    job = torch.load(job_path, weights_only=True)
    torch.set_num_threads(job["threads"])
    res = (child_llmc if tool == "llm-compressor" else child_secompress)(job, ph)
    Path(out_path).write_text(json.dumps({**res, "phases": ph.rows}))


# ---- the parent --------------------------------------------------------------------------------------
def _tree_rss(pid: int) -> tuple[int, int]:
    """(bytes, processes): RSS summed over ``pid`` and its descendants (0 once it is gone)."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total, len(procs)


def run_child(tool: str, python: str, job: Path, work: Path, wait_policy: str) -> dict:
    out, log = work / f"{tool}.json", work / f"{tool}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "OMP_WAIT_POLICY": wait_policy,
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--child", tool, "--job", str(job),
                                 "--child-out", str(out)], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work)
    peak, procs = 0, 0
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss, n = _tree_rss(proc.pid)
        peak, procs = max(peak, rss), max(procs, n)
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{tool} child failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
    res = json.loads(out.read_text())
    ph = {r["phase"]: r for r in res["phases"]}
    return {"tool": tool, "perplexity": res["perplexity"], "quantized_modules": res["quantized_modules"],
            "tree_cpu_s": ru.ru_utime + ru.ru_stime, "tree_peak_rss_mib": max(peak / 2**20, ru.ru_maxrss / 1024),
            "sampled_tree_peak_mib": peak / 2**20, "processes": procs, "wall_s": time.perf_counter() - t0,
            "gptq_run_cpu_s": ph["gptq"]["cpu_s"], "gptq_run_peak_rss_mib": ph["gptq"]["vmhwm_mib"],
            "gptq_phase_cpu_s": ph["gptq"]["cpu_s"] - ph["load"]["cpu_s"], "phases": res["phases"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                    help="OpenMP's idle threads sleep (PASSIVE) or spin (ACTIVE, libgomp's default): on a shared "
                         "machine spinning threads turn every wait into CPU seconds")
    ap.add_argument("--llmc-python", default=LLMC_PYTHON)
    ap.add_argument("--out", default=str(ROOT / "evals" / "results" / "bench_gptq_reference"))
    ap.add_argument("--child", choices=["secompress", "llm-compressor"])
    ap.add_argument("--job")
    ap.add_argument("--child-out")
    args = ap.parse_args()
    if args.child:
        return child_main(args.child, args.job, args.child_out)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "evals" / "reference"))
    from accept import heldout_windows

    from secompress.checkpoints import load_model, load_tokenizer
    from secompress.data import load_calibration

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(MODEL)
    calib = load_calibration("builtin", tok, args.samples, args.seq_len)
    held = heldout_windows(args.eval_samples, args.seq_len)
    base = perplexity(load_model(MODEL, torch.float32), held, args.batch_size)
    python = {"secompress": sys.executable, "llm-compressor": args.llmc_python}
    runs: dict[str, list[dict]] = {t: [] for t in python}
    with tempfile.TemporaryDirectory(prefix="bench-gptq-") as d:
        job = Path(d) / "job.pt"
        torch.save({"model": str(MODEL), "calib": calib.input_ids, "held": held, "batch_size": args.batch_size,
                    "threads": args.threads}, job)
        for r in range(args.reps):  # interleaved: the machine's load changes while this runs
            for tool in (("llm-compressor", "secompress") if r % 2 == 0 else ("secompress", "llm-compressor")):
                runs[tool].append(run_child(tool, python[tool], job, Path(d), args.omp_wait_policy))
                print(f"rep {r} {tool}: {runs[tool][-1]['tree_cpu_s']:.1f} CPU s, "
                      f"{runs[tool][-1]['tree_peak_rss_mib']:.0f} MiB, ppl {runs[tool][-1]['perplexity']:.4f}",
                      flush=True)
    best = {t: min(rs, key=lambda x: x["gptq_run_cpu_s"]) for t, rs in runs.items()}
    s, lc = best["secompress"], best["llm-compressor"]
    lines = [
        f"$ python evals/bench_gptq.py {' '.join(sys.argv[1:])}",
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()}-core CPU shared with other jobs, torch {torch.__version__}, "
        f"{args.threads} threads, OMP_WAIT_POLICY={args.omp_wait_policy}; best of {args.reps} interleaved runs per tool)",
        f"model evals/reference/model (float32); calibration builtin {args.samples} x {args.seq_len} tokens, "
        f"all-expert; symmetric {BITS}-bit, group {GROUP}, no act-order, damp {DAMP}, block {BLOCK}; "
        f"batch {args.batch_size}; perplexity on {args.eval_samples} x {args.seq_len} held-out tokens "
        f"(float32 model: {base:.4f})",
        "",
        f"{'':<16}{'GPTQ run':^24}{'whole child (+ eval)':^26}{'':>12}{'modules':>9}",
        f"{'tool':<16}{'peak RSS MiB':>13}{'CPU s':>11}{'peak RSS MiB':>14}{'CPU s':>12}{'perplexity':>12}{'quantized':>9}",
    ]
    for r in (lc, s):
        lines.append(f"{r['tool']:<16}{r['gptq_run_peak_rss_mib']:>13.0f}{r['gptq_run_cpu_s']:>11.1f}"
                     f"{r['tree_peak_rss_mib']:>14.0f}{r['tree_cpu_s']:>12.1f}{r['perplexity']:>12.4f}"
                     f"{r['quantized_modules']:>9}")
    lines += ["",
              f"secompress / llm-compressor: peak RSS {s['gptq_run_peak_rss_mib'] / lc['gptq_run_peak_rss_mib']:.2f}x "
              f"(goal <= 1), CPU {s['gptq_run_cpu_s'] / lc['gptq_run_cpu_s']:.2f}x (goal <= 1), perplexity "
              f"{100 * (s['perplexity'] / lc['perplexity'] - 1):+.2f}% (goal within 0.5%)",
              f"GPTQ phase alone (after loading): secompress {s['gptq_phase_cpu_s']:.1f} CPU s, llm-compressor "
              f"{lc['gptq_phase_cpu_s']:.1f} CPU s; processes in each tree: secompress {s['processes']}, "
              f"llm-compressor {lc['processes']}"]
    text = "\n".join(lines)
    print(text)
    Path(args.out + ".txt").write_text(text + "\n")
    Path(args.out + ".json").write_text(json.dumps({"args": vars(args), "baseline_perplexity": base, "runs": runs,
                                                    "best": best}, indent=2) + "\n")


if __name__ == "__main__":
    main()
