"""The ``secompress`` command line: one file per command, each ``(add(sub), run(args))``.

    secompress profile MODEL --out DIR [--streaming]       secompress prune MODEL --ratio 0.25 --out DIR
    secompress quantize MODEL --bits 4 --out DIR           secompress run RECIPE
    secompress premoe MODEL --task code=code.jsonl ...     secompress premoe-select DIR --prompt p.txt
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from ..errors import Interrupted, SecompressError
from . import evaluate, premoe, profile, prune, push, quantize, run


COMMANDS = {"profile": profile.COMMAND, "prune": prune.COMMAND, "quantize": quantize.COMMAND, "run": run.COMMAND,
            "evaluate": evaluate.COMMAND, "push": push.COMMAND, **premoe.COMMANDS}


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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given (a model card names it)
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
