"""Benchmark of the seed methods (PreMoe, UNCURL, DERN, STUN) with and without Super-Expert protection.

    python evals/bench_seeds.py [MODEL] --out evals/results/bench_seeds_reference.json [--quick]
    python evals/bench_seeds.py --methods premoe uncurl --out part1.json     # split the sweep ...
    python evals/bench_seeds.py --combine part1.json part2.json --out FILE   # ... and join it

MODEL defaults to evals/reference/model (a real Qwen3-MoE with its Super Expert at layer 0, expert 3).
Two tasks built from the CPython standard library by evals/tasks/build_seed_tasks.py: **code**
(Python without comments and docstrings) and **prose** (the comments and docstrings). Calibration
comes from training-split files, evaluation from held-out files. Measured in this one run:

  1. method x ratio (25%, 50% of each layer's experts) x {SE-protected, unprotected}: per task
     held-out perplexity and next-line accuracy (the multiple choice of evals/tasks/seed_*_nextline,
     scored as lm-eval's ``acc``), peak massive ratio and mean sink mass (secompress.sink on the code
     windows), export size (save_pruned, stock safetensors). PreMoe and UNCURL are calibrated on each
     task (task-specific) and on the built-in mixed text (task-agnostic); DERN, STUN and the REAP
     reference on the built-in text. STUN zeros 2:4 of the kept experts' weights (stage 2);
     "dern-drop" is DERN's drop step alone (no segment recombined), to see what recombination adds.
     A row whose pruned weights are bit for bit those of an earlier row (the digest of every tensor) reuses
     its measurements and names it (``same_weights_as``): typically the unprotected run of a criterion
     that left the Super Expert alone anyway.
  2. UNCURL's threshold factor per task: the largest E / K whose task perplexity stays within
     5% / 10% of the unpruned model's; and its adaptive per-layer counts (in memory; not exportable).
  3. PreMoe retrieval: variants for code and prose at 50%, then held-out queries of each task (two
     lengths) matched to the stored patterns (first MoE layer, and every MoE layer): the share that
     picks its own task's variant.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "evals"))
REFERENCE = ROOT / "evals" / "reference" / "model"
TASKS = ROOT / "evals" / "tasks"
TASK_NAMES = ("code", "prose")
TASK_METHODS = ("premoe", "uncurl")
VARIANTS = {"dern-drop": ("dern", {"dern_threshold": 1.0}),  # DERN's drop alone (no segment is that similar)
            "stun-unstructured": ("stun", {"stun_pattern": "unstructured"})}


def task_windows(tok, name: str, kind: str, n: int, seq: int) -> torch.Tensor:
    from secompress.data import load_calibration

    return load_calibration(TASKS / f"seed_{name}_{kind}.jsonl", tok, n, seq)


def export_bytes(model, tok, result) -> int:
    from secompress.outputs import export_size
    from secompress.prune import save_pruned

    with tempfile.TemporaryDirectory() as d:
        return export_size(save_pruned(model, tok, result, Path(d) / "m"), 0)["bytes"]


@torch.no_grad()
def nextline_accuracy(model, tok, docs: list[dict], batch_size: int = 64) -> float:
    """lm-eval multiple-choice ``acc`` (as evals/bench_merge.py): argmax over choices of
    log P("\\n" + choice | <bos> + context); sequences sorted by length so batches carry little
    padding (on this CPU a few large forwards beat a KV-cached context per item: 3x faster)."""
    seqs, spans = [], []
    for d in docs:
        ctx = [tok.bos_token_id] + tok(d["context"], add_special_tokens=False).input_ids
        for c in d["choices"]:
            cont = tok("\n" + c, add_special_tokens=False).input_ids
            seqs.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    scores = [0.0] * len(seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        n = max(len(seqs[j]) for j in idx)
        ids = torch.tensor([seqs[j] + [pad] * (n - len(seqs[j])) for j in idx])
        mask = torch.tensor([[1] * len(seqs[j]) + [0] * (n - len(seqs[j])) for j in idx])
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)  # [B, n, V]
        for b, j in enumerate(idx):
            a, z = spans[j]
            scores[j] = float(logp[b, a - 1:z - 1].gather(1, ids[b, a:z, None]).sum())
    k = len(docs[0]["choices"])
    return sum(int(max(range(k), key=lambda c: scores[q * k + c]) == d["label"]) for q, d in enumerate(docs)) / len(docs)


METRICS = ("ppl_code", "ppl_prose", "acc_code", "acc_prose", "peak_massive_ratio", "mean_sink_mass")


def weights_digest(model) -> str:
    """SHA-256 over every tensor's name, shape, dtype and bytes: two rows with one digest hold one model."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
        h.update(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def evaluate(model, tok, held: dict, docs: dict, sink_ids, batch_size: int) -> dict:
    from secompress.perplexity import perplexity
    from secompress.sink import measure_sink

    h = measure_sink(model, sink_ids, batch_size)
    row = {f"ppl_{t}": perplexity(model, held[t], batch_size) for t in TASK_NAMES}
    row.update({f"acc_{t}": nextline_accuracy(model, tok, docs[t]) for t in TASK_NAMES})
    row.update(peak_massive_ratio=h.peak_ratio, mean_sink_mass=h.mean_sink_mass)
    return row


def retrieval(model, tok, calib: dict, eval_texts: dict, ratio: float, prof, args) -> dict:
    """PreMoe variants for every task, then queries of each task: share matched to their own."""
    from secompress.checkpoints import load_model
    from secompress.prune import PruneConfig
    from secompress.prune.task_jobs import premoe_variants, select_variant

    cfg = PruneConfig(ratio, "premoe", calib_samples=args.samples, eval_samples=0, seq_len=args.seq_len,
                      batch_size=args.batch_size, task_min_tokens=args.task_min_tokens)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        folder = premoe_variants(model, tok, calib, cfg, Path(d) / "v", profile=prof)
        variant = load_model(folder / TASK_NAMES[0])  # any variant routes the first MoE layer as the original
        for length in args.query_bytes:
            for match, m in (("first", variant), ("all", model)):
                hits, n, conf = 0, 0, {t: {u: 0 for u in TASK_NAMES} for t in TASK_NAMES}
                for t in TASK_NAMES:
                    text = eval_texts[t]
                    for q in range(args.queries):
                        chunk = text[q * length: (q + 1) * length]
                        if len(chunk) < length:
                            break
                        got, _ = select_variant(folder, chunk, model=m, tokenizer=tok, match=match)
                        conf[t][got] += 1
                        hits, n = hits + (got == t), n + 1
                out[f"{match}/{length}B"] = {"accuracy": hits / max(1, n), "queries": n, "confusion": conf}
                print(f"retrieval match={match} {length} B: {hits}/{n}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(REFERENCE))
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=16, help="calibration windows per calibration set")
    ap.add_argument("--eval-samples", type=int, default=8, help="held-out windows per task")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--nextline", type=int, default=40, help="next-line items per task")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--methods", nargs="+", default=["premoe", "uncurl", "dern", "dern-drop", "stun", "reap"],
                    help=f"seed methods, reap, or the variants {', '.join(VARIANTS)}")
    ap.add_argument("--queries", type=int, default=30, help="retrieval queries per task and length")
    ap.add_argument("--query-bytes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--no-extras", action="store_true", help="skip the threshold sweep, adaptive counts, retrieval")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON")
    ap.add_argument("--task-min-tokens", type=int, default=2048, help="PreMoe / UNCURL: refuse less task data")
    ap.add_argument("--quick", action="store_true", help="4 windows of 128, 20 items, 8 queries (task_min_tokens 512)")
    args = ap.parse_args()
    if args.combine:
        return combine(args.combine, args.out)
    if args.quick:
        args.samples, args.eval_samples, args.seq_len, args.nextline, args.queries = 4, 4, 128, 20, 8
        args.task_min_tokens = 512
    torch.set_num_threads(2)

    from secompress.checkpoints import load_model, load_tokenizer
    from secompress.data import load_calibration
    from secompress.profile import ProfileConfig, profile
    from secompress.prune import PruneConfig, prune
    from secompress.prune.task_jobs import uncurl_adaptive, uncurl_threshold

    t0 = time.perf_counter()
    model, tok = load_model(args.model), load_tokenizer(args.model)
    calib = {t: task_windows(tok, t, "calib", args.samples, args.seq_len) for t in TASK_NAMES}
    calib["agnostic"] = load_calibration("builtin", tok, args.samples, args.seq_len)
    held = {t: task_windows(tok, t, "eval", args.eval_samples, args.seq_len).input_ids for t in TASK_NAMES}
    docs = {t: [json.loads(x) for x in (TASKS / f"seed_{t}_nextline.jsonl").read_text().splitlines()[: args.nextline]]
            for t in TASK_NAMES}
    eval_texts = {t: "\n".join(json.loads(x)["text"] for x in (TASKS / f"seed_{t}_eval.jsonl").read_text().splitlines())
                  for t in TASK_NAMES}
    sink_ids = held["code"][:4]
    prof = profile(model, tok, data=calib["agnostic"], progress=False,
                   config=ProfileConfig(num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size))
    print(f"Super Experts {prof.se_ids()}", flush=True)
    base = evaluate(model, tok, held, docs, sink_ids, args.batch_size)
    from secompress.prune.structural import model_size

    base["export_bytes"] = model_size(model)[1]
    rows = [{"method": "baseline", "ratio": 0.0, "calibration": None, "se_protection": None, **base}]
    print(fmt(rows[0]), flush=True)
    runs = [(r, m, c, p) for r in args.ratios for m in args.methods
            for c in (("code", "prose", "agnostic") if m in TASK_METHODS else ("agnostic",)) for p in (True, False)]
    measured: dict[str, dict] = {}  # weights digest -> the row first measured with those weights
    for ratio, method, cal, protect in runs:
        t = time.perf_counter()
        m = copy.deepcopy(model)
        base_method, opts = VARIANTS.get(method, (method, {}))
        cfg = PruneConfig(ratio, base_method, protect_super_experts=protect, calib_samples=args.samples, eval_samples=0,
                          seq_len=args.seq_len, batch_size=args.batch_size, task_min_tokens=args.task_min_tokens,
                          **opts)
        row = {"method": method, "ratio": ratio, "calibration": cal, "se_protection": protect}
        try:
            r = prune(m, tok, cfg, profile=prof, data=calib[cal])
        except ValueError as e:
            rows.append({**row, "error": str(e)})
            print(f"{method} {ratio} {cal} protect={protect}: {e}", flush=True)
            continue
        digest = weights_digest(m)
        if digest in measured:  # bit for bit the model of an earlier row (e.g. the SE kept either way): same figures
            row.update({k: v for k, v in measured[digest].items() if k in METRICS}, same_weights_as=measured[digest]["id"])
        else:
            row.update(evaluate(m, tok, held, docs, sink_ids, args.batch_size))
            measured[digest] = {**row, "id": f"{method} {ratio} {cal} protect={protect}"}
        row.update(experts_after=r.num_experts_after, export_bytes=export_bytes(m, tok, r),
                   super_experts_touched=[list(x) for x in r.removed_super_experts],
                   seconds=round(time.perf_counter() - t, 1))
        if base_method == "stun":
            z = [v for layer in r.extra["stun"]["zeroed_share"].values() for v in layer.values()]
            row["stun_zeroed_share"] = sum(z) / len(z)
        rows.append(row)
        print(fmt(row), flush=True)
        del m
    res = {"model": args.model, "super_experts": [list(s) for s in prof.se_ids()],
           "calibration": {k: f"{v.source}, {v.input_ids.shape[0]} x {args.seq_len}" for k, v in calib.items()},
           "eval": f"evals/tasks/seed_{{code,prose}}_eval.jsonl, {args.eval_samples} x {args.seq_len} each; "
                   f"sink: the first 4 code windows", "nextline_items": args.nextline, "rows": rows}
    if not args.no_extras and "uncurl" in args.methods:
        res["uncurl_threshold"] = {}
        for tname in TASK_NAMES:
            cfg = PruneConfig(0.25, "uncurl", calib_samples=args.samples, eval_samples=0, seq_len=args.seq_len,
                              batch_size=args.batch_size, task_min_tokens=args.task_min_tokens)
            sweep = uncurl_threshold(model, tok, cfg, calib[tname], held[tname], ratios=(0.25, 0.5, 0.625, 0.75),
                                     tolerance=0.05, profile=prof)
            ok10 = [x["factor"] for x in sweep["sweep"] if "relative" in x and x["relative"] <= 0.10]
            sweep["threshold_factor_10pct"] = max(ok10, default=None)
            res["uncurl_threshold"][tname] = sweep
            print(f"UNCURL threshold on {tname}: 5% -> {sweep['threshold_factor']}, 10% -> "
                  f"{sweep['threshold_factor_10pct']}", flush=True)
        res["uncurl_adaptive"] = []
        for tname in TASK_NAMES:
            m = copy.deepcopy(model)
            cfg = PruneConfig(0.5, "uncurl", calib_samples=args.samples, eval_samples=0, seq_len=args.seq_len,
                              batch_size=args.batch_size, task_min_tokens=args.task_min_tokens)
            rep = uncurl_adaptive(m, tok, cfg, calib[tname], profile=prof)
            row = {"calibration": tname, "experts_per_layer": rep["experts_per_layer"],
                   "eigengap_estimate": rep["eigengap_estimate"],
                   **evaluate(m, tok, held, docs, sink_ids, args.batch_size)}
            res["uncurl_adaptive"].append(row)
            print(f"UNCURL adaptive on {tname}: {row['experts_per_layer']} ppl {row['ppl_' + tname]:.3f}", flush=True)
            del m
    if not args.no_extras and "premoe" in args.methods:
        res["premoe_retrieval"] = retrieval(model, tok, {t: calib[t] for t in TASK_NAMES}, eval_texts, 0.5, prof, args)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    write(res, Path(args.out))


def combine(files: list[str], out: str) -> None:
    parts = [json.loads(Path(f).read_text()) for f in files]
    res = dict(parts[0])
    res["rows"] = parts[0]["rows"][:1] + [r for p in parts for r in p["rows"] if r["method"] != "baseline"]
    for p in parts[1:]:
        for k in ("uncurl_threshold", "uncurl_adaptive", "premoe_retrieval"):
            if k in p:
                res[k] = p[k]
    res["seconds"] = [p["seconds"] for p in parts]
    res["parts"] = files
    write(res, Path(out))


def fmt(r: dict) -> str:
    if "error" in r:
        return f"{r['method']} {r['ratio']} {r['calibration']} protect={r['se_protection']}: refused ({r['error']})"
    return (f"{r['method']:<8}{r['ratio']:>5} {str(r['calibration']):<9} protect={str(r['se_protection']):<5} "
            f"ppl code {r['ppl_code']:.3f} prose {r['ppl_prose']:.3f} acc {r['acc_code']:.2f}/{r['acc_prose']:.2f} "
            f"ratio {r['peak_massive_ratio']:.1f} sink {r['mean_sink_mass']:.4f} "
            f"{r['export_bytes'] / 2**20:.2f} MiB SEs touched {r.get('super_experts_touched', '-')} "
            f"({r.get('seconds', '-')} s)" + (f" = weights of {r['same_weights_as']}" if "same_weights_as" in r else ""))


def table(rows: list[dict]) -> str:
    lines = ["| method | ratio | calibration | SE protection | ppl code | ppl prose | next-line code | next-line prose | "
             "peak massive ratio | sink mass | export MiB | SEs touched |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        prot = "-" if r["se_protection"] is None else ("on" if r["se_protection"] else "off")
        if "error" in r:
            lines.append(f"| {r['method']} | {r['ratio']} | {r['calibration']} | {prot} | refused: {r['error']} |||||||")
            continue
        lines.append(f"| {r['method']} | {r['ratio']} | {r['calibration'] or '-'} | {prot} | {r['ppl_code']:.3f} | "
                     f"{r['ppl_prose']:.3f} | {r['acc_code']:.2f} | {r['acc_prose']:.2f} | "
                     f"{r['peak_massive_ratio']:.1f} | {r['mean_sink_mass']:.4f} | {r['export_bytes'] / 2**20:.2f} | "
                     f"{r.get('super_experts_touched', '-') or '-'} |")
    return "\n".join(lines)


def protection_md(rows: list[dict]) -> str:
    """Each (method, ratio, calibration): what switching SE protection off did (unprotected - protected)."""
    out = ["", "Where SE protection changed the result (unprotected minus protected; 'same weights': the criterion "
           "left the Super Expert alone either way, so protection changed nothing):", "",
           "| method | ratio | calibration | SEs touched unprotected | same weights | ppl code | ppl prose | "
           "next-line code | next-line prose | peak massive ratio (on -> off) | sink mass (on -> off) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = {(r["method"], r["ratio"], r["calibration"], r["se_protection"]): r for r in rows if "error" not in r}
    for (method, ratio, cal, prot), on in runs.items():
        off = runs.get((method, ratio, cal, False))
        if not prot or off is None:
            continue
        same = off.get("same_weights_as") == f"{method} {ratio} {cal} protect=True"
        out.append(f"| {method} | {ratio} | {cal} | {off.get('super_experts_touched') or '-'} | "
                   f"{'yes' if same else 'no'} | {off['ppl_code'] - on['ppl_code']:+.3f} | "
                   f"{off['ppl_prose'] - on['ppl_prose']:+.3f} | {off['acc_code'] - on['acc_code']:+.2f} | "
                   f"{off['acc_prose'] - on['acc_prose']:+.2f} | {on['peak_massive_ratio']:.1f} -> "
                   f"{off['peak_massive_ratio']:.1f} | {on['mean_sink_mass']:.4f} -> {off['mean_sink_mass']:.4f} |")
    return "\n".join(out)


def extras_md(res: dict) -> str:
    out = [protection_md(res["rows"])]
    if "uncurl_threshold" in res:
        out += ["", "UNCURL threshold (largest E/K whose task perplexity stays within 5% / 10% of the unpruned):", "",
                "| task | baseline ppl | sweep (E/K: ppl, change) | threshold 5% | threshold 10% |", "|---|---|---|---|---|"]
        for t, s in res["uncurl_threshold"].items():
            sw = "; ".join(f"{x['factor']}: {x['perplexity']:.3f} ({100 * x['relative']:+.1f}%)" for x in s["sweep"]
                           if "perplexity" in x)
            out.append(f"| {t} | {s['baseline_perplexity']:.3f} | {sw} | {s['threshold_factor']} | "
                       f"{s['threshold_factor_10pct']} |")
    if "uncurl_adaptive" in res:
        out += ["", "UNCURL adaptive per-layer counts at 50% (in memory only: a config holds one count):", "",
                "| calibration | experts per layer | eigengap estimate | ppl code | ppl prose |", "|---|---|---|---|---|"]
        for r in res["uncurl_adaptive"]:
            out.append(f"| {r['calibration']} | {list(r['experts_per_layer'].values())} | "
                       f"{list(r['eigengap_estimate'].values())} | {r['ppl_code']:.3f} | {r['ppl_prose']:.3f} |")
    if "premoe_retrieval" in res:
        out += ["", "PreMoe retrieval (share of held-out queries that pick their own task's variant):", "",
                "| match | query length | accuracy | queries | confusion (task -> picked) |", "|---|---|---|---|---|"]
        for k, v in res["premoe_retrieval"].items():
            match, length = k.split("/")
            out.append(f"| {match} | {length} | {v['accuracy']:.2f} | {v['queries']} | {v['confusion']} |")
    return "\n".join(out)


def write(res: dict, out: Path) -> None:
    out.write_text(json.dumps(res, indent=1) + "\n")
    md = table(res["rows"]) + "\n" + extras_md(res) + "\n"
    out.with_suffix(".md").write_text(md)
    plot(res, out.with_suffix(".png"))
    print(md)
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")


def plot(res: dict, path: Path) -> None:
    """Per task: perplexity of every method / calibration at each ratio, SE-protected (filled) vs not
    (hatched), the baseline dashed; a third panel: the peak massive ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in res["rows"] if r["method"] != "baseline" and "error" not in r]
    if not rows:
        return
    base = res["rows"][0]
    labels = list(dict.fromkeys(f"{r['method']}\n{r['calibration']}" for r in rows))
    ratios = sorted({r["ratio"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    keys = [("ppl_code", "perplexity on code (held-out)"), ("ppl_prose", "perplexity on prose (held-out)"),
            ("peak_massive_ratio", "peak massive ratio (code windows)")]
    width = 0.8 / (2 * len(ratios))
    colors = plt.cm.tab10.colors
    for ax, (key, title) in zip(axes, keys):
        x = np.arange(len(labels))
        for i, ratio in enumerate(ratios):
            for j, protect in enumerate((True, False)):
                vals = []
                for lab in labels:
                    hit = [r for r in rows if f"{r['method']}\n{r['calibration']}" == lab and r["ratio"] == ratio
                           and r["se_protection"] == protect]
                    vals.append(hit[0][key] if hit else np.nan)
                off = (2 * i + j - (2 * len(ratios) - 1) / 2) * width
                ax.bar(x + off, vals, width, color=colors[i], alpha=1.0 if protect else 0.45,
                       hatch=None if protect else "//", edgecolor="black", linewidth=0.4,
                       label=f"{int(ratio * 100)}% {'SE-protected' if protect else 'unprotected'}")
        ax.axhline(base[key], color="black", ls="--", lw=1, label="baseline")
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_title(title, fontsize=10)
        if key == "peak_massive_ratio":
            ax.set_yscale("log")
        else:
            lo = min(base[key], np.nanmin([r[key] for r in rows]))
            ax.set_ylim(lo * 0.97, min(np.nanmax([r[key] for r in rows]) * 1.03, base[key] * 3))
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"seed methods on the {Path(res['model']).parent.name} model: 25% / 50% of experts, "
                 f"Super Expert {res['super_experts']} protected or not (calibration under each name)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
