"""``secompress prune``: remove or merge a share of every MoE layer's routed experts, or a share of
every expert's intermediate neurons, sparing Super Experts.

    secompress prune MODEL --ratio 0.25 --method reap [--profile DIR] [--no-se-protection] --out OUT [--overwrite]
    secompress prune MODEL --ratio 0.5 --method m-smoe|hc-smoe ...   # merge experts (ratio: share merged away)
    secompress prune MODEL --ratio 0.5 --method heapr ...            # prune neurons (ratio: share of the width)
"""
from __future__ import annotations

from ..checkpoints import DTYPE_CHOICES
from .api import ALL_METHODS
from .heapr import HESSIANS


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="remove routed experts (Super Experts are kept unless told otherwise)")
    p.add_argument("model", help="checkpoint folder or hub id")
    p.add_argument("--ratio", type=float, required=True,
                   help="share of each MoE layer's routed experts to remove or merge away (heapr: of each expert's "
                        "intermediate width)")
    p.add_argument("--method", default="reap", choices=ALL_METHODS,
                   help="expert scores, naee, expert merging (m-smoe, hc-smoe) or neuron pruning (heapr)")
    p.add_argument("--hessian", default="fisher", choices=HESSIANS,
                   help="heapr: output-space Hessian from loss gradients (fisher) or the identity (no backward)")
    p.add_argument("--profile", default=None, help="a profile directory from `secompress profile` (else profile now)")
    p.add_argument("--no-se-protection", action="store_true", help="allow removing Super Experts")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--data", default="builtin", help="builtin, a .txt/.jsonl file, or hf:NAME[:CONFIG]:SPLIT")
    p.add_argument("--eval-data", default=None, help="held-out text for perplexity (default: windows of --data "
                                                     "after the calibration ones)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows")
    p.add_argument("--eval-samples", type=int, default=8, help="held-out windows (0: no perplexity)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="seed of the random method")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: the checkpoint's own dtype")
    p.add_argument("--revision", default=None)
    p.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own Python code")


def _prune(args) -> int:
    from ..checkpoints import load_model, load_tokenizer
    from ..outputs import check_output_dir
    from ..profile_io import load_profile
    from .api import PruneConfig, plan_for, prune, save_pruned, summary_table

    check_output_dir(args.out, args.overwrite, inputs=(args.model, args.data))  # fail before any compute
    cfg = PruneConfig(ratio=args.ratio, method=args.method, protect_super_experts=not args.no_se_protection,
                      seed=args.seed, calib_samples=args.samples, eval_samples=args.eval_samples,
                      seq_len=args.seq_len, batch_size=args.batch_size, hessian=args.hessian)
    prof = load_profile(args.profile) if args.profile else None
    model = load_model(args.model, args.dtype, args.revision, args.trust_remote_code)
    plan_for(model, cfg.ratio, cfg.method)  # a ratio the router cannot take fails before the tokenizer and data
    tok = load_tokenizer(args.model, args.revision, args.trust_remote_code)
    result = prune(model, tok, cfg, profile=prof, data=args.data, eval_data=args.eval_data, progress=True)
    save_pruned(model, tok, result, args.out, overwrite=args.overwrite)
    print(summary_table(result))
    print(f"wrote {args.out} (safetensors, config.json, tokenizer, prune_report.json)")
    return 0


COMMAND = (_add_prune, _prune)  # the entry of secompress.cli.COMMANDS
