"""``secompress prune``: remove a share of every MoE layer's routed experts, sparing Super Experts.

    secompress prune MODEL --ratio 0.25 --method reap [--profile DIR] [--no-protect-super-experts] --out OUT [--overwrite]
"""
from __future__ import annotations

from ..cli_args import (add_command, add_profile_arg, add_protection, device_map_arg, model_parent,
                        output_parent)
from .api import RECONSTRUCTION_METHODS
from .scores import SCORERS


def _add_prune(sub) -> None:
    p = add_command(sub, "prune", "remove routed experts (Super Experts are kept unless told otherwise)",
                    parents=(model_parent(), output_parent()))
    p.add_argument("--ratio", type=float, required=True, help="share of each MoE layer's routed experts to remove")
    p.add_argument("--method", default="reap", choices=sorted(SCORERS) + list(RECONSTRUCTION_METHODS),
                   help="how experts are scored (or NAEE reconstruction)")
    add_profile_arg(p)
    add_protection(p, "removed")
    p.add_argument("--eval-data", default=None, help="held-out text for perplexity (default: windows of --data "
                                                     "after the calibration ones)")
    p.add_argument("--eval-samples", type=int, default=8, help="held-out windows (0: no perplexity)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random method")
    p.add_argument("--streaming", action="store_true",
                   help="one decoder layer at a time (models larger than memory; score methods only)")


def _prune(args) -> int:
    from ..checkpoints import load_model, load_tokenizer
    from ..cli_args import check_calibration_args, load_profile_arg
    from ..outputs import check_output_dir, checkpoint_bytes
    from .api import PruneConfig, plan_for, prune, save_pruned, summary_table

    check_output_dir(args.out, args.overwrite, inputs=(args.model, args.data),  # fail before any compute
                     need_bytes=checkpoint_bytes(args.model))
    check_calibration_args(args)
    cfg = PruneConfig(ratio=args.ratio, method=args.method, protect_super_experts=args.protect_super_experts,
                      seed=args.seed, calib_samples=args.num_samples, eval_samples=args.eval_samples,
                      seq_len=args.seq_len, batch_size=args.batch_size)
    if args.streaming:
        from ..streamed import run_cli

        return run_cli(args, prune_cfg=cfg)
    prof = load_profile_arg(args.profile)
    model = load_model(args.model, args.dtype, args.revision, args.trust_remote_code, device=device_map_arg(args))
    plan_for(model, cfg.ratio)  # a ratio the router cannot take fails before the tokenizer and data
    tok = load_tokenizer(args.model, args.revision, args.trust_remote_code)
    result = prune(model, tok, cfg, profile=prof, data=args.data, eval_data=args.eval_data, progress=True)
    save_pruned(model, tok, result, args.out, overwrite=args.overwrite)
    print(summary_table(result))
    print(f"wrote {args.out} (safetensors, config.json, tokenizer, prune_report.json)")
    return 0


COMMAND = (_add_prune, _prune)  # the entry of secompress.cli.COMMANDS
