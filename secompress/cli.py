"""The ``secompress`` command line.

    secompress profile MODEL --out DIR [--data builtin|FILE|hf:NAME:SPLIT] [--streaming]
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from .cli_args import add_command, model_parent, output_parent
from .errors import Interrupted, SecompressError
from .prune.cli import COMMAND as PRUNE_COMMAND
from .prune.premoe_cli import COMMANDS as PREMOE_COMMANDS
from .quant.cli import COMMAND as QUANTIZE_COMMAND
from .recipe.cli import COMMAND as RUN_COMMAND
from .se_rule import SERule


def _add_profile(sub) -> None:
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


def _profile(args) -> int:
    from .outputs import check_output_dir
    from .profile import ProfileConfig, profile
    from .profile_io import save_profile, summary_table

    check_output_dir(args.out, args.overwrite, inputs=(args.model, args.data))  # fail before any compute
    cfg = ProfileConfig(
        rule=SERule(args.layer_fraction, args.percentile, args.max_ratio), num_samples=args.num_samples,
        seq_len=args.seq_len, batch_size=args.batch_size, streaming=args.streaming, dtype=args.dtype)
    result = profile(args.model, data=args.data, config=cfg, revision=args.revision,
                     trust_remote_code=args.trust_remote_code, device=args.device)
    save_profile(result, args.out, overwrite=args.overwrite, plots=not args.no_plots)
    print(summary_table(result))
    print(f"wrote {args.out}/super_experts.json, expert_stats.csv" +
          ("" if args.no_plots else ", se_heatmap.png, layers.png"))
    return 0


COMMANDS = {
    "profile": (_add_profile, _profile),
    "prune": PRUNE_COMMAND,
    "quantize": QUANTIZE_COMMAND,
    "run": RUN_COMMAND,
    **PREMOE_COMMANDS,
}


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Interrupted("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="secompress", description="Super-Expert-aware MoE compression")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = ap.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    # SIGTERM becomes an exception, so every `with` block (temporary folders, hooks) cleans up as for Ctrl-C
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return COMMANDS[args.command][1](args)
    except (SecompressError, ValueError) as e:
        return _fail(str(e))
    except OSError as e:
        if args.verbose:
            raise
        where = f"'{e.filename}': " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}")
    except Interrupted:
        print("secompress: terminated (SIGTERM); temporary files removed, nothing written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("secompress: interrupted (Ctrl-C); temporary files removed, nothing written", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _fail(message: str) -> int:
    """One line on stderr (a multi-line message is joined), exit status 2."""
    print("secompress: error: " + " ".join(message.split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
