"""The flags every ``secompress`` command shares, named like the recipe keys, with one set of defaults."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoints import DTYPE_CHOICES
from ..dtypes import DEFAULT_DTYPE
from ..errors import SecompressError
from ..outputs import FORCE
from ..profile import DEFAULT_BATCH_SIZE, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN

class FORMATTER(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default that says something (not None, off or empty)."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d):
            return action.help
        return super()._get_help_string(action)


def model_parent() -> argparse.ArgumentParser:
    """Checkpoint and calibration flags (recipe keys: model.*, data.*)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("model", help="checkpoint folder or hub id")
    p.add_argument("--data", default="builtin", help="calibration text: builtin, a .txt/.jsonl file, or "
                                                     "hf:NAME[:CONFIG]:SPLIT (recipe: data.calibration)")
    p.add_argument("--num-samples", "--samples", dest="num_samples", type=int, default=DEFAULT_NUM_SAMPLES,
                   help="calibration windows (recipe: data.num_samples)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per calibration window")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="windows per forward pass")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(DTYPE_CHOICES),
                   help="dtype to load the weights in ('auto': the checkpoint's own)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of MODEL")
    p.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own Python code")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="compute device ('auto': CUDA when present; recipe: model.device)")
    return p


def output_parent(required: bool = True, default_help: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", required=required, default=None,
                   help="output directory (must not exist unless --overwrite)" + default_help)
    add_overwrite(p)
    return p


def add_overwrite(p: argparse.ArgumentParser) -> None:
    """``--overwrite`` (replace an output folder secompress wrote) and ``--force`` (any folder)."""
    p.add_argument("--overwrite", action=_Overwrite, nargs=0, default=False,
                   help="replace an existing output directory that secompress wrote")
    p.add_argument("--force", action=_Overwrite, nargs=0, dest="overwrite", const=FORCE, default=False,
                   help="replace an existing output directory even if secompress did not write it (implies "
                        "--overwrite)")


class _Overwrite(argparse.Action):
    """--overwrite sets ``overwrite`` to True, --force to 'force'; the stronger one wins in any order."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, False) != FORCE:
            setattr(namespace, self.dest, self.const if self.const is not None else True)


def add_protection(p: argparse.ArgumentParser, what: str) -> None:
    """``--protect-super-experts`` / ``--no-protect-super-experts`` (recipe: protect_super_experts)."""
    p.add_argument("--protect-super-experts", action=argparse.BooleanOptionalAction, default=True,
                   help=f"keep Super Experts from being {what}")
    p.add_argument("--no-se-protection", dest="protect_super_experts", action="store_false",
                   default=argparse.SUPPRESS, help="the same as --no-protect-super-experts")


def add_profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None, help="a profile folder from `secompress profile`; without it the model is profiled now")


def check_calibration_args(args) -> None:
    if args.num_samples < 1 or args.batch_size < 1 or args.seq_len < 2:
        raise SecompressError(f"--num-samples and --batch-size must be >= 1 and --seq-len >= 2, got "
                              f"{args.num_samples}, {args.batch_size}, {args.seq_len}")


def load_profile_arg(path: str | None):
    """The profile named by ``--profile`` (None if not given); a clear error naming the path otherwise."""
    if path is None:
        return None
    from ..profile_io import load_profile

    p = Path(path)
    d = p if p.is_dir() else p.parent
    missing = [f for f in ("super_experts.json", "arrays.npz") if not (d / f).is_file()]
    if not p.exists() or missing:
        what = "does not exist" if not p.exists() else f"holds no {' or '.join(missing)}"
        raise SecompressError(f"--profile '{path}' {what}: give a folder written by `secompress profile`")
    return load_profile(path)


def open_source(args):
    """The :class:`~secompress.source.Source` the flags name (resolved once: local folder or hub id, config,
    dtype, device)."""
    from ..source import Source

    return Source.open(args.model, args.revision, args.trust_remote_code, args.dtype, args.device)


def add_command(sub, name: str, help: str, parents=()) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, parents=list(parents), formatter_class=FORMATTER)
