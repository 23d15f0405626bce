"""``secompress prune``: remove or merge a share of every MoE layer's routed experts, or a share of
every expert's intermediate neurons, sparing Super Experts.

    secompress prune MODEL --ratio 0.25 --method reap [--profile DIR] [--no-protect-super-experts] --out OUT [--overwrite]
    secompress prune MODEL --ratio 0.5 --method m-smoe|hc-smoe ...   # merge experts (ratio: share merged away)
    secompress prune MODEL --ratio 0.5 --method heapr ...            # prune neurons (ratio: share of the width)
"""
from __future__ import annotations

from ..cli_args import (add_command, add_profile_arg, add_protection, device_map_arg, model_parent,
                        output_parent)
from ..errors import SecompressError
from .api import ALL_METHODS
from .heapr import HESSIANS


def _add_prune(sub) -> None:
    p = add_command(sub, "prune", "remove or merge routed experts, or prune their neurons (Super Experts are kept "
                                  "unless told otherwise)", parents=(model_parent(), output_parent()))
    p.add_argument("--ratio", type=float, required=True,
                   help="share of each MoE layer's routed experts to remove or merge away (heapr: of each expert's "
                        "intermediate width)")
    p.add_argument("--method", default="reap", choices=ALL_METHODS,
                   help="expert scores, naee, expert merging (m-smoe, hc-smoe), neuron pruning (heapr), or the "
                        "seed methods premoe / uncurl (for the task in --data), dern, stun")
    p.add_argument("--hessian", default="fisher", choices=HESSIANS,
                   help="heapr: output-space Hessian from loss gradients (fisher) or the identity (no backward)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a seed method's option (PruneConfig field), e.g. stun_pattern=unstructured, "
                        "task_min_tokens=4096, tcess_threshold=0.3, uncurl_counts=uniform, dern_threshold=0.1")
    add_profile_arg(p)
    add_protection(p, "removed, merged or pruned")
    p.add_argument("--eval-data", default=None, help="held-out text for perplexity (default: windows of --data "
                                                     "after the calibration ones)")
    p.add_argument("--eval-samples", type=int, default=8, help="held-out windows (0: no perplexity)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random method")
    p.add_argument("--streaming", action="store_true",
                   help="one decoder layer at a time (models larger than memory; score methods, m-smoe, hc-smoe, heapr)")


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
                      seq_len=args.seq_len, batch_size=args.batch_size, hessian=args.hessian,
                      **_options(args.option))
    if args.streaming:
        from ..streamed import run_cli

        return run_cli(args, prune_cfg=cfg)
    prof = load_profile_arg(args.profile)
    model = load_model(args.model, args.dtype, args.revision, args.trust_remote_code, device=device_map_arg(args))
    plan_for(model, cfg.ratio, cfg.method)  # a ratio the router cannot take fails before the tokenizer and data
    tok = load_tokenizer(args.model, args.revision, args.trust_remote_code)
    result = prune(model, tok, cfg, profile=prof, data=args.data, eval_data=args.eval_data, progress=True)
    save_pruned(model, tok, result, args.out, overwrite=args.overwrite)
    print(summary_table(result))
    print(f"wrote {args.out} (safetensors, config.json, tokenizer, prune_report.json)")
    return 0


_OPTIONS = {"task_min_tokens": int, "tcess_top_k": int, "tcess_threshold": float, "uncurl_counts": str,
            "dern_threshold": float, "stun_sparsity": float, "stun_pattern": str, "stun_similarity": str}


def _options(pairs: list[str]) -> dict:
    """``--option KEY=VALUE`` pairs as PruneConfig fields (one clear error for an unknown key or value)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in _OPTIONS:
            raise SecompressError(f"--option '{pair}': expected KEY=VALUE with KEY one of {', '.join(_OPTIONS)}")
        try:
            out[key] = _OPTIONS[key](value)
        except ValueError:
            raise SecompressError(f"--option {key}: '{value}' is not a {_OPTIONS[key].__name__}") from None
    return out


COMMAND = (_add_prune, _prune)  # the entry of secompress.cli.COMMANDS
