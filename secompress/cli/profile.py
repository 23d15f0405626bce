"""``secompress profile MODEL --out DIR [--data builtin|FILE|hf:NAME:SPLIT] [--streaming]``."""
from __future__ import annotations

from ..se_rule import SERule
from .args import add_command, model_parent, output_parent


def _add(sub) -> None:
    p = add_command(sub, "profile", "find the Super Experts of an MoE checkpoint",
                    parents=(model_parent(), output_parent()))
    p.add_argument("--streaming", action="store_true", help="materialise one decoder layer at a time")
    p.add_argument("--layer-fraction", type=float, default=SERule.layer_fraction,
                   help="the SE rule looks at this leading share of the layers")
    p.add_argument("--percentile", type=float, default=SERule.percentile,
                   help="an SE's max |down_proj output| is above this percentile of all experts'")
    p.add_argument("--max-ratio", type=float, default=SERule.max_ratio,
                   help="an SE must exceed this fraction of the largest max")
    p.add_argument("--no-plots", action="store_true", help="skip se_heatmap.png and layers.png")


def _run(args) -> int:
    from ..outputs import check_output_dir
    from ..profile import ProfileConfig, profile
    from ..profile_io import save_profile, summary_table
    from .args import open_source

    check_output_dir(args.out, args.overwrite, inputs=(args.model, args.data))  # fail before any compute
    cfg = ProfileConfig(
        rule=SERule(args.layer_fraction, args.percentile, args.max_ratio), num_samples=args.num_samples,
        seq_len=args.seq_len, batch_size=args.batch_size, streaming=args.streaming, dtype=args.dtype)
    result = profile(open_source(args), data=args.data, config=cfg)
    save_profile(result, args.out, overwrite=args.overwrite, plots=not args.no_plots)
    print(summary_table(result))
    print(f"wrote {args.out}/super_experts.json, expert_stats.csv" +
          ("" if args.no_plots else ", se_heatmap.png, layers.png"))
    return 0


COMMAND = (_add, _run)
