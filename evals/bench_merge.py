"""Benchmark of expert merging and neuron pruning with and without Super-Expert protection (not a test).

    python evals/bench_merge.py [MODEL] --out evals/results/bench_merge_reference.json [--quick]

MODEL defaults to evals/reference/model. Measured in this one run, on the same data:

  1. M-SMoE and HC-SMoE merging 25% and 50% of every MoE layer's experts, against REAP
     pruning to the same count, each with Super-Expert protection on and off;
  2. HEAPr removing 25% and 50% of every expert's intermediate width (Fisher output-space
     scores), protection on and off; with the share of the HEAPr score a uniform width keeps
     against a per-expert (non-uniform) width with the same neuron budget.

Columns: held-out perplexity (reference held-out stream), next-line accuracy (the offline
lm-eval task secompress_stdlib_nextline scored directly: the summed log-likelihood of
"\\n" + each choice after <bos> + context, first --nextline docs; the same scoring lm-eval's
``acc`` uses), peak massive ratio and mean attention mass on token 0 (secompress.sink, on the
held-out windows), and the sink gate's verdict at threshold 0.5.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT / "evals" / "reference" / "model"
NEXTLINE = ROOT / "evals" / "tasks" / "stdlib_nextline.jsonl"


@torch.no_grad()
def nextline_accuracy(model, tok, docs: list[dict], batch_size: int = 16) -> float:
    """lm-eval multiple-choice ``acc``: argmax over choices of log P("\\n" + choice | <bos> + context)."""
    bos = tok.bos_token_id
    seqs, spans = [], []
    for d in docs:
        ctx = [bos] + tok(d["context"], add_special_tokens=False).input_ids
        for c in d["choices"]:
            cont = tok("\n" + c, add_special_tokens=False).input_ids
            seqs.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
    scores = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for i in range(0, len(seqs), batch_size):
        chunk, sp = seqs[i:i + batch_size], spans[i:i + batch_size]
        n = max(map(len, chunk))
        ids = torch.tensor([s + [pad] * (n - len(s)) for s in chunk])
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in chunk])
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)  # [B, n, V]
        for b, (a, z) in enumerate(sp):
            tgt = ids[b, a:z]
            scores.append(float(logp[b, a - 1:z - 1].gather(1, tgt[:, None]).sum()))
    k = len(docs[0]["choices"])
    right = sum(int(max(range(k), key=lambda j: scores[q * k + j]) == d["label"]) for q, d in enumerate(docs))
    return right / len(docs)


def evaluate(model, tok, held, docs, base_sink, batch_size: int) -> dict:
    from secompress.perplexity import perplexity
    from secompress.sink import SinkHealthError, check_sink, measure_sink

    h = measure_sink(model, held, batch_size)
    row = {"perplexity": perplexity(model, held, batch_size), "nextline_acc": nextline_accuracy(model, tok, docs),
           "peak_massive_ratio": h.peak_ratio, "mean_sink_mass": h.mean_sink_mass,
           "massive_ratio_per_layer": h.massive_ratio, "sink_mass_per_layer": h.sink_mass}
    if base_sink is not None:
        try:
            check_sink(base_sink, h, 0.5)
            row["sink_gate"] = "pass"
        except SinkHealthError:
            row["sink_gate"] = "FAIL"
    return row, h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(REFERENCE))
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=16, help="calibration windows (builtin text)")
    ap.add_argument("--eval-samples", type=int, default=8, help="held-out windows (reference held-out stream)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--nextline", type=int, default=100, help="next-line docs scored")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--methods", nargs="+", default=["m-smoe", "hc-smoe", "reap", "heapr"],
                    help="run only these (several processes may split the sweep; see --combine)")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="merge the rows of partial result files into --out (one baseline) and print the table")
    ap.add_argument("--quick", action="store_true", help="4 calibration + 2 held-out windows of 128, 20 docs")
    args = ap.parse_args()
    if args.combine:
        return combine(args.combine, args.out)
    if args.quick:
        args.samples, args.eval_samples, args.seq_len, args.nextline = 4, 2, 128, 20
    torch.set_num_threads(2)

    from secompress.checkpoints import load_model, load_tokenizer
    from secompress.data import load_calibration
    from secompress.profile import ProfileConfig, profile
    from secompress.prune import PruneConfig, prune
    from secompress.sink import plot_sink

    sys.path.insert(0, str(ROOT / "evals" / "reference"))
    from accept import heldout_windows

    t0 = time.perf_counter()
    model, tok = load_model(args.model), load_tokenizer(args.model)
    calib = load_calibration("builtin", tok, args.samples, args.seq_len)
    held = heldout_windows(args.eval_samples, args.seq_len)
    docs = [json.loads(l) for l in NEXTLINE.read_text().splitlines()[: args.nextline]]
    prof = profile(model, tok, data=calib, config=ProfileConfig(num_samples=args.samples, seq_len=args.seq_len,
                                                                 batch_size=args.batch_size), progress=False)
    print(f"Super Experts {prof.se_ids()}", flush=True)
    base, base_sink = evaluate(model, tok, held, docs, None, args.batch_size)
    rows = [{"method": "baseline", "ratio": 0.0, "se_protection": None, **base}]
    sinks = {"baseline": base_sink}
    print(f"baseline ppl {base['perplexity']:.3f} acc {base['nextline_acc']:.2f} "
          f"ratio {base['peak_massive_ratio']:.1f} sink {base['mean_sink_mass']:.4f}", flush=True)
    runs = [(r, m, p) for r in args.ratios for m in args.methods for p in (True, False)]
    for ratio, method, protect in runs:
        t = time.perf_counter()
        m = copy.deepcopy(model)
        cfg = PruneConfig(ratio, method, protect_super_experts=protect, calib_samples=args.samples, eval_samples=0,
                          seq_len=args.seq_len, batch_size=args.batch_size)
        row = {"method": method, "ratio": ratio, "se_protection": protect}
        try:
            r = prune(m, tok, cfg, profile=prof, data=calib)
        except ValueError as e:
            row["error"] = str(e)
            rows.append(row)
            print(f"{method} {ratio} protect={protect}: {e}", flush=True)
            continue
        ev, h = evaluate(m, tok, held, docs, base_sink, args.batch_size)
        row.update(ev, experts_after=r.num_experts_after, params_after=r.params_after,
                   super_experts_touched=[list(x) for x in r.removed_super_experts])
        if method == "heapr":
            lay = r.extra["heapr"]["layers"]
            row["retained_score_uniform"] = {l: v["retained_score_uniform"] for l, v in lay.items()}
            row["retained_score_nonuniform"] = {l: v["retained_score_nonuniform"] for l, v in lay.items()}
            row["nonuniform_widths"] = {l: v["nonuniform_widths"] for l, v in lay.items()}
            row["width_after"] = r.extra["heapr"]["intermediate_size_after"]
        if method != "reap":
            row["details"] = r.extra
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        if ratio == max(args.ratios) and method in ("m-smoe", "heapr"):
            sinks[f"{method} {int(ratio * 100)}% SE-{'aware' if protect else 'unaware'}"] = h
        print(f"{method:<8}{ratio:>5} protect={protect!s:<5} ppl {row['perplexity']:.3f} acc {row['nextline_acc']:.2f} "
              f"ratio {row['peak_massive_ratio']:.1f} sink {row['mean_sink_mass']:.4f} gate {row['sink_gate']} "
              f"SEs touched {row['super_experts_touched']} ({row['seconds']} s)", flush=True)
    out = Path(args.out)
    plot_sink(sinks, out.with_suffix(".png"), f"{label(args.model)}: sink health after 50% compression")
    out.write_text(json.dumps({"model": args.model, "sinks": {k: h.to_json() for k, h in sinks.items()}, "super_experts": [list(s) for s in prof.se_ids()],
                               "calibration": f"builtin, {args.samples} x {args.seq_len}",
                               "eval": f"reference held-out stream, {args.eval_samples} x {args.seq_len}",
                               "nextline_docs": len(docs), "rows": rows,
                               "seconds": round(time.perf_counter() - t0, 1)}, indent=1) + "\n")
    print(table(rows))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def combine(files: list[str], out: str) -> None:
    """One result file (the first file's baseline, every file's runs) and the sink plot."""
    from secompress.sink import SinkHealth, plot_sink

    parts = [json.loads(Path(f).read_text()) for f in files]
    res = dict(parts[0])
    res["rows"] = parts[0]["rows"][:1] + [r for p in parts for r in p["rows"] if r["method"] != "baseline"]
    res["sinks"] = {k: v for p in parts for k, v in p["sinks"].items()}
    res["seconds"] = [p["seconds"] for p in parts]
    res["parts"] = files
    keys = ("hidden_max", "hidden_first_max", "hidden_median", "sink_mass")
    plot_sink({k: SinkHealth(*(v[x] for x in keys)) for k, v in res["sinks"].items()}, Path(out).with_suffix(".png"),
              f"{label(res['model'])}: sink health after 50% compression")
    Path(out).write_text(json.dumps(res, indent=1) + "\n")
    print(table(res["rows"]))
    print(f"wrote {out} and {Path(out).with_suffix('.png')}")


def label(model: str) -> str:
    """A model folder's name for titles ('evals/reference/model' -> 'reference model')."""
    p = Path(model)
    return f"{p.parent.name} model" if p.name == "model" else p.name


def table(rows: list[dict]) -> str:
    lines = ["| method | ratio | SE protection | perplexity | next-line acc | peak massive ratio | sink mass | gate | "
             "SEs merged/damaged |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['ratio']} | {r['se_protection']} | refused: {r['error']} |||||")
            continue
        prot = "-" if r["se_protection"] is None else ("on" if r["se_protection"] else "off")
        lines.append(f"| {r['method']} | {r['ratio']} | {prot} | {r['perplexity']:.3f} | {r['nextline_acc']:.2f} | "
                     f"{r['peak_massive_ratio']:.1f} | {r['mean_sink_mass']:.4f} | {r.get('sink_gate', '-')} | "
                     f"{r.get('super_experts_touched', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
