"""``secompress evaluate MODEL_OR_EXPORT [--baseline MODEL] [--tasks T ...] [--out DIR]``.

Loads any checkpoint the way it should be loaded (``secompress.load``: a secompress export with its real
quantized modules, a compressed-tensors export of another tool, a plain or pruned checkpoint) and measures
held-out perplexity on windows of ``--data``, sink health (massive ratio, attention mass on the first
token) and the lm-eval tasks given; with ``--baseline`` the same on another model, side by side with
the recovery ratios.
"""
from __future__ import annotations

from .args import add_command, add_overwrite, model_parent


def _add(sub) -> None:
    p = add_command(sub, "evaluate", "perplexity, sink health and lm-eval tasks of a checkpoint or an export",
                    parents=(model_parent(),))
    p.add_argument("--baseline", default=None, help="a second model (e.g. the uncompressed one) measured the same way")
    p.add_argument("--tasks", nargs="*", default=[], help="lm-eval task names (the eval extra)")
    p.add_argument("--task-path", action="append", default=[], help="a folder of lm-eval task YAMLs (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: documents per task")
    p.add_argument("--out", default=None, help="write evaluation.{json,md} into this folder (must not exist)")
    add_overwrite(p)


def _run(args) -> int:
    import json

    from .. import load
    from ..data import load_calibration
    from ..errors import SecompressError
    from ..outputs import atomic_dir, check_output_dir
    from ..recipe.evaluation import measure_tasks, sink_rows
    from ..recipe.schema import EvaluateStage
    from ..sink import measure_sink
    from ..source import Source
    from .args import check_calibration_args

    if args.out:
        check_output_dir(args.out, args.overwrite, inputs=(args.model, args.baseline))
    check_calibration_args(args)
    stage = EvaluateStage(tasks=list(args.tasks), task_paths=list(args.task_path), limit=args.limit,
                          compare_se_unaware=False)
    if stage.tasks:
        from ..recipe.evaluation import task_manager

        known = set(task_manager(stage).all_tasks)
        bad = [t for t in stage.tasks if t not in known]
        if bad:
            raise SecompressError(f"lm-eval has no task {bad[0]!r} (searched lm-eval's tasks"
                                  + (f" and {', '.join(stage.task_paths)}" if stage.task_paths else "") + ")")
    rows = {}
    for label, name in (("model", args.model), ("baseline", args.baseline)):
        if name is None:
            continue
        source = Source.open(name, args.revision, args.trust_remote_code, args.dtype, args.device)
        tok = source.tokenizer()
        ids = load_calibration(args.data, tok, args.num_samples, args.seq_len).input_ids
        model = load(source.path, dtype=args.dtype, device=None if source.device.type == "cpu" else str(source.device),
                     trust_remote_code=args.trust_remote_code)
        from ..perplexity import perplexity

        got = {"perplexity": perplexity(model, ids, args.batch_size)}
        got.update(sink_rows(measure_sink(model, ids)))
        got.update(measure_tasks(model, tok, stage, label))
        rows[label] = got
        del model
    text = _table(rows)
    print(text)
    if args.out:
        with atomic_dir(args.out, args.overwrite) as tmp:
            (tmp / "evaluation.json").write_text(json.dumps({"model": args.model, "baseline": args.baseline,
                                                             "data": args.data, "rows": rows}, indent=1))
            (tmp / "evaluation.md").write_text(text + "\n")
        print(f"wrote {args.out}/evaluation.json, evaluation.md")
    return 0


def _table(rows: dict[str, dict[str, float]]) -> str:
    """metric | model | baseline | recovery (model vs baseline: higher is better, whatever the metric)."""
    from ..recipe.evaluation import LOWER_IS_BETTER

    f = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    m, b = rows["model"], rows.get("baseline", {})
    lines = ["| metric | model | baseline | recovery |", "|---|---|---|---|"]
    for k, v in m.items():
        base = b.get(k)
        rec = None if not base or not v else (base / v if k.split("/")[-1] in LOWER_IS_BETTER else v / base)
        lines.append(f"| {k} | {f(v)} | {f(base)} | {f(rec)} |")
    return "\n".join(lines)


COMMAND = (_add, _run)
