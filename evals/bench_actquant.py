"""Benchmark of activation-quantization schemes with and without Super-Expert awareness (not a test).

    python evals/bench_actquant.py --out evals/results/bench_actquant_reference.json [--quick]

Two models: the bundled reference model (its real Super Expert at layer 0, expert 3, massive ratio
~200) and the same model with that Super Expert's massive neuron amplified (its up-projection row
scaled so the first-token massive ratio is in the thousands, as in published MoE models). Per scheme
(compressed-tensors presets, plus ``W8A8-static``: INT8 channel weights with static per-tensor INT8
activations, no preset, served by vLLM for Linear layers but not fused MoE: it reproduces the issue's
measurement) and variant:

- ``SE-unaware``: every unit quantized, static scales the max over all calibration tokens (llm-compressor);
- ``SE-aware``: the Super Expert's layer keeps its experts 16-bit (``se_mode: layer``, the precision plan);
- ``SE-aware + smoothing``: plus SmoothQuant on the attention input and EAQuant's expert-aware
  aggregation and down-projection outlier channels (statistics without massive tokens).

All variants calibrate every expert on every token (llm-compressor's default, EAQuant's balanced
calibration). Columns: held-out loss change (nats/token) and perplexity on the reference held-out stream
(not used for calibration: the builtin text is), next-line accuracy (secompress_stdlib_nextline, scored as
lm-eval's ``acc``), peak massive ratio and mean attention mass on token 0 (``secompress.sink``), the
export's size (the compressed-tensors tensors written for every layer, 16-bit tensors counted at 2 bytes
as in a bf16 checkpoint) against bf16, and the quantization wall time. On the reference model, also
EAQuant's router alignment (a quantized router's clipping chosen by top-k KL) against plain min-max,
and llm-compressor's QuantizationModifier on the same model and calibration in a child process
(``--llmc-python``), timed in the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "evals"))
REFERENCE = ROOT / "evals" / "reference" / "model"
NEXTLINE = ROOT / "evals" / "tasks" / "stdlib_nextline.jsonl"
VARIANTS = ("SE-unaware", "SE-aware", "SE-aware + smoothing")
FULL = ("W8A8-static", "FP8", "NVFP4")  # every variant
LIGHT = ("FP8_DYNAMIC", "W8A8", "MXFP4")  # dynamic activations: unaware and aware only
LLMC = ("FP8", "W8A8", "NVFP4")


def w8a8_static():
    from compressed_tensors.quantization import QuantizationArgs

    from secompress.quant.schemes import custom_scheme

    return custom_scheme("W8A8-static", weights=QuantizationArgs(num_bits=8, type="int", strategy="channel"),
                         input_activations=QuantizationArgs(num_bits=8, type="int", strategy="tensor", dynamic=False))


def scheme_of(name: str):
    from secompress.quant.schemes import get_scheme

    return w8a8_static() if name == "W8A8-static" else get_scheme(name)


def export_bytes(model) -> int:
    """Bytes of the compressed-tensors export: every layer's tensors + the rest, 16-bit floats at 2 bytes."""
    from secompress.adapters import get_adapter
    from secompress.quant.formats.ct import rest_tensors
    from secompress.quant.ct_schemes import layer_tensors

    ad = get_adapter(model.config)
    tensors = dict(rest_tensors(model, ad))
    for i, layer in enumerate(ad.layers(model)):
        tensors.update(layer_tensors(layer, i, ad))
    total = 0
    for k, t in tensors.items():
        size = 2 if t.dtype == torch.float32 and not k.endswith("global_scale") else t.element_size()
        total += t.numel() * size
    return total


def bf16_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * 2
    return total


def evaluate(model, tok, held, docs, batch_size) -> dict:
    from bench_merge import nextline_accuracy

    from secompress.perplexity import mean_loss
    from secompress.sink import measure_sink

    loss = mean_loss(model, held, batch_size)
    h = measure_sink(model, held[:4], batch_size)
    return {"loss": loss, "perplexity": math.exp(loss), "nextline_acc": nextline_accuracy(model, tok, docs),
            "peak_massive_ratio": h.peak_ratio, "mean_sink_mass": h.mean_sink_mass}


@torch.no_grad()
def amplify_super_expert(model, calib, layer: int, expert: int, target: float, held) -> dict:
    """Scale the up-projection row of the SE's massive neuron until the first-token massive ratio
    reaches ``target`` (in place); returns the neuron, the factor and the ratio."""
    from secompress.adapters import get_adapter
    from secompress.experts import layout_of, split_gate_up
    from secompress.quant.actstats import collect_layer
    from secompress.sink import measure_sink

    ad = get_adapter(model.config)
    with collect_layer(ad.layers(model)[layer], ad) as st:
        model(input_ids=calib[:4])
    neuron = int(st.w2[expert].channel_amax.argmax())
    ex = ad.experts_of(ad.block_of(ad.layers(model)[layer]))
    base = measure_sink(model, held[:4]).peak_ratio
    factor = max(1.0, target / base)
    gu = ex.gate_up_proj[expert]
    _, up = split_gate_up(gu.T if layout_of(ex).transposed else gu, layout_of(ex).concatenated)
    up[neuron] *= factor
    return {"layer": layer, "expert": expert, "neuron": neuron, "factor": factor,
            "ratio_before": base, "ratio_after": measure_sink(model, held[:4]).peak_ratio}


def run_variant(base, tok, calib, held, docs, name, variant, ses, batch_size) -> dict:
    from secompress.quant.actapply import apply_scheme
    from secompress.quant.plan import resolve_plan
    from secompress.quant.smoothing import SmoothConfig

    m = copy.deepcopy(base)
    sch = scheme_of(name)
    aware = variant != "SE-unaware"
    plan = resolve_plan(m, ses=ses if aware else [], se_mode="layer", se_bits=None, default=sch.weight_bits)
    t = time.perf_counter()
    rep = apply_scheme(m, sch, calib, plan=plan, all_experts=True, batch_size=batch_size,
                       smooth=SmoothConfig() if variant.endswith("smoothing") else None)
    secs = time.perf_counter() - t
    row = {"scheme": name, "variant": variant, "quant_seconds": round(secs, 1), **evaluate(m, tok, held, docs, batch_size),
           "export_bytes": export_bytes(m)}
    if rep.smoothing:
        row["smoothing"] = {i: {k: v for k, v in s.items() if k in ("output_change", "routing_change")}
                            for i, s in rep.smoothing.items()}
    l0 = rep.stats.get(ses[0][0]) if ses else None
    if l0 is not None and l0.w2:
        w2 = [float(s.amax) for s in l0.w2 if s.amax is not None]
        row["se_layer_w2_amax"] = {"se": w2[ses[0][1]], "max_other": max(v for e, v in enumerate(w2) if e != ses[0][1])}
    return row, m


@torch.no_grad()
def router_rows(model, tok, calib, held, docs, batch_size) -> list[dict]:
    """EAQuant router alignment vs min-max on an already quantized model's routers (weights only)."""
    from secompress.adapters import get_adapter
    from secompress.quant.router_align import align_router, topk_agreement
    from secompress.quant.schemes import get_scheme

    ad = get_adapter(model.config)
    k = ad.top_k(model.config)
    inputs: dict[int, list] = {}
    hooks = [ad.router_of(ad.block_of(ad.layers(model)[i])).register_forward_pre_hook(
        lambda mod, a, i=i: inputs.setdefault(i, []).append(a[0].detach())) for i in ad.moe_layer_indices(model)]
    model(input_ids=calib)
    for h in hooks:
        h.remove()
    rows = []
    for sname in ("FP8", "NVFP4"):
        args = get_scheme(sname).weights
        for mode in ("min-max", "EAQuant aligned"):
            m = copy.deepcopy(model)
            kl, agree = [], []
            for i, xs in inputs.items():
                r = ad.router_of(ad.block_of(ad.layers(m)[i]))
                x = torch.cat(xs)
                al = align_router(r.weight, x, args, k, getattr(r, "bias", None), low=1.0 if mode == "min-max" else 0.35)
                ref = torch.nn.functional.linear(x, r.weight)
                r.weight.copy_(al.weight)
                kl.append(al.kl)
                agree.append(topk_agreement(ref, torch.nn.functional.linear(x, al.weight), k))
            rows.append({"scheme": "FP8 (SE-aware)", "variant": f"router {sname} {mode}",
                         "router_kl": sum(kl) / len(kl), "router_topk_agreement": sum(agree) / len(agree),
                         **evaluate(m, tok, held, docs, batch_size)})
            print(f"  router {sname} {mode}: KL {rows[-1]['router_kl']:.4f} agree {rows[-1]['router_topk_agreement']:.3f} "
                  f"loss {rows[-1]['loss']:.4f}", flush=True)
    return rows


LLMC_CHILD = r'''
import json, sys, time, resource, torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
model_dir, ids_file, scheme = sys.argv[1:4]
ids = json.load(open(ids_file))
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
t = time.perf_counter()
oneshot(model=m, dataset=ds, recipe=QuantizationModifier(targets="Linear", scheme=scheme,
        ignore=["lm_head", "re:.*mlp.gate$"]), num_calibration_samples=len(ids), max_seq_length=len(ids[0]))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def llmc_time(python: str, model_dir: str, calib, scheme: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        ids = Path(d) / "ids.json"
        ids.write_text(json.dumps(calib.tolist()))
        res = subprocess.run([python, "-c", LLMC_CHILD, model_dir, str(ids), scheme], capture_output=True, text=True,
                             timeout=3600, env={**os.environ, "PYTHONPATH": ""})
    if res.returncode:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(rows: list[dict], base: dict) -> str:
    lines = ["| model | scheme | variant | Δ loss (nats) | recovered | perplexity | next-line acc | peak massive ratio | "
             "sink mass | export (x bf16) | quant s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    unaware = {(r["model"], r["scheme"]): r["loss"] - base[r["model"]]["loss"] for r in rows if r["variant"] == "SE-unaware"}
    for r in rows:
        b = base[r["model"]]
        d = r["loss"] - b["loss"]
        u = unaware.get((r["model"], r["scheme"]))
        rec = "" if r["variant"] == "SE-unaware" or u is None or u <= 0 else f"{1 - d / u:.0%}"
        size = f"{r['export_bytes'] / 2**20:.2f} MiB ({r['export_bytes'] / b['bf16_bytes']:.2f})" if "export_bytes" in r else ""
        lines.append(f"| {r['model']} | {r['scheme']} | {r['variant']} | {d:+.4f} | {rec} | {r['perplexity']:.3f} | "
                     f"{r['nextline_acc']:.2f} | {r['peak_massive_ratio']:.0f} | {r['mean_sink_mass']:.3f} | {size} | "
                     f"{r.get('quant_seconds', '')} |")
    return "\n".join(lines)


def plot(rows, base, timing, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(base)
    schemes = list(dict.fromkeys(r["scheme"] for r in rows if r["variant"] in VARIANTS))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    colors = {"SE-unaware": "#d62728", "SE-aware": "#1f77b4", "SE-aware + smoothing": "#2ca02c"}
    for ax, model in zip(axes[0], models):
        for j, v in enumerate(VARIANTS):
            xs, ys = [], []
            for i, s in enumerate(schemes):
                r = next((r for r in rows if r["model"] == model and r["scheme"] == s and r["variant"] == v), None)
                if r is not None:
                    xs.append(i + (j - 1) * 0.27)
                    ys.append(r["loss"] - base[model]["loss"])
            bars = ax.bar(xs, ys, 0.27, color=colors[v], label=v)
            for x, y in zip(xs, ys):
                ax.text(x, y, f"{y:+.4f}", ha="center", va="bottom" if y >= 0 else "top", fontsize=6, rotation=90)
            del bars
        ax.margins(y=0.2)
        ax.set_xticks(range(len(schemes)), schemes, fontsize=8)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylabel("held-out loss change vs bf16 (nats/token)")
        ax.set_title(f"{model}: massive ratio {base[model]['peak_massive_ratio']:.0f}, loss {base[model]['loss']:.3f}",
                     fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[1][0]
    ref = models[0]
    sizes = [(s, next(r["export_bytes"] for r in rows if r["model"] == ref and r["scheme"] == s
                      and r["variant"] == "SE-unaware") / base[ref]["bf16_bytes"]) for s in schemes]
    aware = [next(r["export_bytes"] for r in rows if r["model"] == ref and r["scheme"] == s
                  and r["variant"] == "SE-aware") / base[ref]["bf16_bytes"] for s in schemes]
    ax.bar([i - 0.2 for i in range(len(sizes))], [v for _, v in sizes], 0.4, color="#d62728", label="all layers quantized")
    ax.bar([i + 0.2 for i in range(len(sizes))], aware, 0.4, color="#1f77b4", label="SE layer's experts 16-bit")
    for i, ((_, v), a) in enumerate(zip(sizes, aware)):
        ax.text(i - 0.2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.text(i + 0.2, a, f"{a:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(sizes)), [s for s, _ in sizes], fontsize=8)
    ax.axhline(1, color="black", lw=0.6, ls="--")
    ax.set_ylabel("export size / bf16 checkpoint")
    ax.set_title(f"{ref}: compressed-tensors export size", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1][1]
    names = [s for s in timing if "ours" in timing[s]]
    ours = [timing[s]["ours"] for s in names]
    theirs = [timing[s].get("llmc", {}).get("seconds", float("nan")) for s in names]
    ax.bar([i - 0.2 for i in range(len(names))], ours, 0.4, color="#1f77b4", label="secompress (fake-quant, resident)")
    ax.bar([i + 0.2 for i in range(len(names))], theirs, 0.4, color="#7f7f7f", label="llm-compressor QuantizationModifier")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        ax.text(i - 0.2, a, f"{a:.0f}s", ha="center", va="bottom", fontsize=7)
        if b == b:
            ax.text(i + 0.2, b, f"{b:.0f}s", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("quantization wall time (s)")
    ax.set_title(f"{ref}: same scheme, model and calibration, one run (shared 2-core CPU)", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle("Activation quantization with and without Super-Expert awareness", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=8, help="calibration windows (builtin text)")
    ap.add_argument("--eval-samples", type=int, default=8, help="held-out windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--nextline", type=int, default=60)
    ap.add_argument("--target-ratio", type=float, default=3000.0, help="massive ratio of the planted model")
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python")
    ap.add_argument("--models", nargs="+", default=["reference", "planted"], choices=["reference", "planted"],
                    help="run only these (two processes may split the run; see --combine)")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON", help="merge partial result files into --out")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.combine:
        return combine(args.combine, args.out)
    full, light, llmc = FULL, LIGHT, LLMC
    if args.quick:  # a smoke run of every code path
        args.samples, args.eval_samples, args.seq_len, args.nextline = 2, 2, 64, 10
        full, light, llmc = ("FP8",), ("W8A8",), ("FP8",)
    torch.set_num_threads(2)

    from secompress.checkpoints import load_model, load_tokenizer
    from secompress.data import load_calibration
    from secompress.profile import ProfileConfig, profile

    sys.path.insert(0, str(ROOT / "evals" / "reference"))
    from accept import heldout_windows as held_fn

    t0 = time.perf_counter()
    ref = load_model(str(REFERENCE), dtype="float32")
    tok = load_tokenizer(str(REFERENCE))
    calib = load_calibration("builtin", tok, args.samples, args.seq_len).input_ids
    held = held_fn(args.eval_samples, args.seq_len)
    docs = [json.loads(line) for line in NEXTLINE.read_text().splitlines()[: args.nextline]]
    prof = profile(ref, tok, data=load_calibration("builtin", tok, args.samples, args.seq_len),
                   config=ProfileConfig(num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size),
                   progress=False)
    ses = [(int(l), int(e)) for l, e in prof.se_ids()]
    print(f"Super Experts {ses}", flush=True)
    planted = copy.deepcopy(ref)
    plant = amplify_super_expert(planted, calib, ses[0][0], ses[0][1], args.target_ratio, held)
    print(f"planted: {plant}", flush=True)
    models = {"reference": ref, "planted SE (x{:.0f})".format(plant["factor"]): planted}
    models = {k: v for k, v in models.items() if k.split()[0] in args.models}
    base, rows, timing = {}, [], {}
    for mname, model in models.items():
        base[mname] = {**evaluate(model, tok, held, docs, args.batch_size), "bf16_bytes": bf16_bytes(model)}
        print(f"{mname} bf16: {base[mname]}", flush=True)
        for name in full + light:
            for variant in (VARIANTS if name in full else VARIANTS[:2]):
                row, qm = run_variant(model, tok, calib, held, docs, name, variant, ses, args.batch_size)
                row["model"] = mname
                rows.append(row)
                print(f"{mname:<24}{name:<12}{variant:<22} dloss {row['loss'] - base[mname]['loss']:+.4f} "
                      f"acc {row['nextline_acc']:.2f} ratio {row['peak_massive_ratio']:.0f} "
                      f"sink {row['mean_sink_mass']:.3f} size {row['export_bytes'] / 2**20:.2f} MiB "
                      f"({row['quant_seconds']} s)", flush=True)
                if mname == "reference" and name == "FP8" and variant == "SE-aware":
                    for r in router_rows(qm, tok, calib, held, docs, args.batch_size):
                        rows.append({**r, "model": mname})
                if mname == "reference" and variant == "SE-unaware" and name in llmc:
                    timing[name] = {"ours": row["quant_seconds"]}
                del qm
    if Path(args.llmc_python).exists() and "reference" in args.models:
        for name in llmc:
            timing[name]["llmc"] = llmc_time(args.llmc_python, str(REFERENCE), calib, name)
            print(f"llm-compressor {name}: {timing[name]['llmc']}", flush=True)
    result = {"models": list(models), "super_experts": ses, "planted": plant, "base": base, "rows": rows,
              "timing": timing, "calibration": f"builtin {args.samples}x{args.seq_len}",
              "eval": f"reference held-out stream {args.eval_samples}x{args.seq_len}", "nextline_docs": len(docs),
              "seconds": round(time.perf_counter() - t0, 1)}
    write(result, Path(args.out))


def combine(files: list[str], out: str) -> None:
    """One result from partial runs (``--models`` split over processes): their bases, rows and timings."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    res = dict(parts[0])
    for key in ("base", "timing"):
        res[key] = {k: v for p in parts for k, v in p[key].items()}
    res["rows"] = [r for p in parts for r in p["rows"]]
    res["models"] = list(res["base"])
    res["seconds"] = [p["seconds"] for p in parts]
    res["parts"] = files
    write(res, Path(out))


def write(res: dict, out: Path) -> None:
    base, rows, timing, ses, plant = res["base"], res["rows"], res["timing"], res["super_experts"], res["planted"]
    main_rows = [r for r in rows if r["variant"] in VARIANTS]
    router = [r for r in rows if r["variant"] not in VARIANTS]
    md = ["# Activation quantization: SE-unaware vs SE-aware (evals/bench_actquant.py)", "",
          f"Calibration: {res['calibration']} (builtin text, all-expert calibration); held-out: {res.get('eval', 'n/a')}; "
          f"next-line: first {res.get('nextline_docs', 'n/a')} docs. Super Experts {ses}; planted model: {plant}. float32 "
          "fake-quant on the CPU with vLLM's serving rules (FP8: the per-layer max of the experts' input scales; "
          "NVFP4: one global input scale per fused MoE layer).", "",
          "| model | bf16 loss | perplexity | next-line acc | peak massive ratio | sink mass | bf16 size |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {m} | {b['loss']:.4f} | {b['perplexity']:.3f} | {b['nextline_acc']:.2f} | {b['peak_massive_ratio']:.0f} | "
           f"{b['mean_sink_mass']:.3f} | {b['bf16_bytes'] / 2**20:.2f} MiB |" for m, b in base.items()]
    md += ["", table(main_rows, base)]
    if router:
        md += ["", "Router alignment (EAQuant Sec. 3.2) on the SE-aware FP8 reference model; vLLM serves routers "
               "16-bit, so this applies only where a runtime quantizes them:", "",
               "| router | top-k KL | top-k agreement | Δ loss | next-line acc |", "|---|---|---|---|---|"]
        md += [f"| {r['variant']} | {r['router_kl']:.4f} | {r['router_topk_agreement']:.3f} | "
               f"{r['loss'] - base[r['model']]['loss']:+.4f} | {r['nextline_acc']:.2f} |" for r in router]
    if timing:
        md += ["", "Quantization wall time, reference model, same scheme and calibration, in one run:", "",
               "| scheme | secompress (s) | llm-compressor QuantizationModifier (s) |", "|---|---|---|"]
        md += [f"| {s} | {t['ours']} | {t.get('llmc', {}).get('seconds', t.get('llmc', {}).get('error', 'n/a'))} |"
               for s, t in timing.items()]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    plot(main_rows, base, timing, out.with_suffix(".png"))
    print("\n".join(md))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
