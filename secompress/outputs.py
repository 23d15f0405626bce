"""Output folders: refuse dangerous destinations, write atomically (temporary folder, then rename)."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError

log = logging.getLogger(__name__)


def check_output_dir(out: str | Path, overwrite: bool, inputs=(), root: str | Path | None = None) -> Path:
    """``out`` as given, after refusing every output that would replace something it must not.

    Refused: the filesystem root, the home folder, the working directory or any folder above it,
    anything that is or holds one of ``inputs`` (model folder, data files, recipe), a path outside
    ``root`` when one is given (outputs named by a recipe stay under the output root), a symlink,
    and an existing non-directory. An existing directory needs ``overwrite``.
    """
    out = Path(out)
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor) or real == Path.home().resolve() or real == cwd or real in cwd.parents:
        raise OutputExistsError(f"refusing to write to '{out}': it is the root, the home folder, or the working "
                                "directory or a folder above it; name a new folder")
    if root is not None and Path(root).resolve() not in real.parents:
        raise OutputExistsError(f"output '{out}' is outside the output root '{root}'")
    for p in inputs:
        if p is None:
            continue
        rp = Path(p).resolve()
        if rp == real or real in rp.parents:
            raise OutputExistsError(f"output '{out}' would replace the input '{p}'; choose another folder")
    if out.is_symlink():
        raise OutputExistsError(f"output '{out}' is a symbolic link; give the real folder")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output '{out}' exists and is not a folder")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory '{out}' exists; pass overwrite=True (--overwrite) to replace it")
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside ``out``; it becomes ``out`` only if the block succeeds.

    On any error the temporary directory is removed and an existing ``out`` is untouched.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("wrote %s", out)
