"""``secompress prune``: remove or merge a share of every MoE layer's routed experts, or a share of
every expert's intermediate neurons, sparing Super Experts.

    secompress prune MODEL --ratio 0.25 --method reap [--profile DIR] [--no-protect-super-experts] --out OUT
    secompress prune MODEL --ratio 0.5 --method m-smoe|hc-smoe ...   # merge experts (ratio: share merged away)
    secompress prune MODEL --ratio 0.5 --method heapr ...            # prune neurons (ratio: share of the width)
    secompress prune MODEL --ratio 0.5 --method premoe --data task.jsonl ...   # for one task (also uncurl)
    secompress prune MODEL --ratio 0.5 --method stun --option stun_pattern=unstructured ...   # dern, stun
"""
from __future__ import annotations

from ..errors import SecompressError
from ..prune.heapr import HESSIANS
from ..prune.methods import PRUNE_METHODS
from .args import add_command, add_profile_arg, add_protection, model_parent, output_parent


_OPTIONS = {"task_min_tokens": int, "tcess_top_k": int, "tcess_threshold": float, "dern_threshold": float,
            "stun_sparsity": float, "stun_pattern": str, "stun_similarity": str}  # premoe / uncurl, dern, stun


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


def _add(sub) -> None:
    p = add_command(sub, "prune", "remove or merge routed experts, or prune their neurons (Super Experts are kept "
                                  "unless told otherwise)", parents=(model_parent(), output_parent()))
    p.add_argument("--ratio", type=float, required=True,
                   help="share of each MoE layer's routed experts to remove or merge away (heapr: of each expert's "
                        "intermediate width)")
    p.add_argument("--method", default="reap", choices=list(PRUNE_METHODS),
                   help="expert scores, naee, expert merging (m-smoe, hc-smoe), neuron pruning (heapr), or premoe / "
                        "uncurl (pruned for the task in --data), dern, stun")
    p.add_argument("--hessian", default="fisher", choices=HESSIANS,
                   help="heapr: output-space Hessian from loss gradients (fisher) or the identity (no backward)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (PruneConfig field): " + ", ".join(_OPTIONS))
    add_profile_arg(p)
    add_protection(p, "removed, merged or pruned")
    p.add_argument("--eval-data", default=None, help="held-out text for perplexity (default: windows of --data "
                                                     "after the calibration ones)")
    p.add_argument("--eval-samples", type=int, default=8, help="held-out windows (0: no perplexity)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random method")
    p.add_argument("--streaming", action="store_true",
                   help="one decoder layer at a time from the checkpoint's shards (models larger than memory)")


def _run(args) -> int:
    from ..prune.config import PruneConfig
    from .job import compress_command

    cfg = PruneConfig(ratio=args.ratio, method=args.method, protect_super_experts=args.protect_super_experts,
                      seed=args.seed, calib_samples=args.num_samples, eval_samples=args.eval_samples,
                      seq_len=args.seq_len, batch_size=args.batch_size, hessian=args.hessian, **_options(args.option))
    return compress_command(args, prune_cfg=cfg)


COMMAND = (_add, _run)
