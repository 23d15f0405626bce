"""``secompress premoe`` and ``secompress premoe-select``: PreMoe's task variants and retrieval.

    secompress premoe MODEL --task code=code.jsonl --task prose=prose.jsonl --ratio 0.5 --out DIR
        # DIR/code/, DIR/prose/ (one pruned stock checkpoint per task), DIR/premoe_index.json
    secompress premoe-select DIR --prompt prompt.txt [--model ORIGINAL --match all]
        # prints the task whose variant fits the prompt, its folder, and every task's distance
"""
from __future__ import annotations

from ..errors import SecompressError
from .args import add_command, add_profile_arg, add_protection, model_parent, output_parent


def _add_premoe(sub) -> None:
    p = add_command(sub, "premoe", "PreMoe: one pruned checkpoint per task (by TCESS) and the pattern index to "
                                   "pick one for a prompt", parents=(model_parent(), output_parent()))
    p.add_argument("--task", action="append", required=True, metavar="NAME=DATA",
                   help="a task and its data (.txt/.jsonl/hf:...); repeat for several tasks (--data is unused)")
    p.add_argument("--ratio", type=float, required=True, help="share of each MoE layer's routed experts removed")
    p.add_argument("--tcess-top-k", type=int, default=0, help="router logits per token that count (0: top_k)")
    p.add_argument("--tcess-threshold", type=float, default=0.0,
                   help="a selection counts when its softmax among the top-k is at least this")
    p.add_argument("--task-min-tokens", type=int, default=2048, help="refuse task data with fewer tokens")
    p.add_argument("--match", default="first", choices=("first", "all"),
                   help="retrieval compares the first MoE layer's pattern (no expert needed) or every layer's")
    add_profile_arg(p)
    add_protection(p, "removed")


def _premoe(args) -> int:
    from ..checkpoints import check_finite_weights
    from ..outputs import check_output_dir, checkpoint_bytes, export_size
    from ..prune.api import PruneConfig
    from ..prune.task_jobs import premoe_variants
    from .args import check_calibration_args, load_profile_arg, open_source

    tasks = {}
    for spec in args.task:
        name, sep, data = spec.partition("=")
        if not sep or not name or not data:
            raise SecompressError(f"--task '{spec}': expected NAME=DATA, e.g. code=code.jsonl")
        if name in tasks:
            raise SecompressError(f"--task '{name}' is given twice")
        tasks[name] = data
    check_output_dir(args.out, args.overwrite, inputs=(args.model, *tasks.values()),
                     need_bytes=len(tasks) * checkpoint_bytes(args.model))
    check_calibration_args(args)
    cfg = PruneConfig(ratio=args.ratio, method="premoe", protect_super_experts=args.protect_super_experts,
                      calib_samples=args.num_samples, eval_samples=0, seq_len=args.seq_len, batch_size=args.batch_size,
                      task_min_tokens=args.task_min_tokens, tcess_top_k=args.tcess_top_k,
                      tcess_threshold=args.tcess_threshold)
    source = open_source(args)
    cfg.prune_method.target(source.skeleton(), cfg)  # a ratio the router cannot take: before any weight is read
    prof = load_profile_arg(args.profile)
    tok = source.tokenizer()
    model = source.load()
    check_finite_weights(model, args.model)
    out = premoe_variants(model, tok, tasks, cfg, args.out, profile=prof, overwrite=args.overwrite, match=args.match)
    sizes = {n: export_size(out / n, source.nbytes) for n in tasks}
    print(f"wrote {out}: one pruned checkpoint per task and premoe_index.json")
    for n, size in sizes.items():
        print(f"  {n}/: {size['bytes'] / 2**20:.1f} MiB in {size['files']} files, {size['ratio']:.2f}x the "
              f"checkpoint's {size['source_bytes'] / 2**20:.1f} MiB")
    return 0


def _add_select(sub) -> None:
    p = add_command(sub, "premoe-select", "PreMoe retrieval: which task variant of a `secompress premoe` folder fits "
                                          "a prompt")
    p.add_argument("folder", help="a folder written by `secompress premoe`")
    p.add_argument("--prompt", required=True, help="a text file holding the prompt")
    p.add_argument("--model", default=None, help="the original checkpoint (needed for --match all; default: the "
                                                 "folder's first variant, enough for --match first)")
    p.add_argument("--match", default=None, choices=("first", "all"), help="default: the index's own")


def _select(args) -> int:
    from pathlib import Path

    from ..checkpoints import load_model, load_tokenizer
    from ..prune.task_jobs import select_variant

    prompt = Path(args.prompt)
    if not prompt.is_file():
        raise SecompressError(f"--prompt '{args.prompt}' is not a file")
    model = load_model(args.model) if args.model else None
    tok = load_tokenizer(args.model) if args.model else None
    name, dist = select_variant(args.folder, prompt.read_text(encoding="utf-8", errors="replace"), model, tok,
                                args.match)
    print(f"{name}\t{Path(args.folder) / name}")
    print("L2 distances: " + ", ".join(f"{n} {d:.4f}" for n, d in sorted(dist.items(), key=lambda x: x[1])))
    return 0


COMMANDS = {"premoe": (_add_premoe, _premoe), "premoe-select": (_add_select, _select)}  # entries of secompress.cli.COMMANDS
