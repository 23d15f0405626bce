"""Output folders: refuse dangerous destinations, check writability and free space before any
compute, write atomically (temporary folder, then rename), and sweep the temporaries that a killed
process left behind.

Every temporary secompress makes beside an output is named ``.NAME.KIND-PID-RANDOM`` (KIND: tmp,
work, old), so the next run can tell a dead process's leftovers (``os.kill(PID, 0)`` fails) from a
live run's and remove only those.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError, OutputWriteError

log = logging.getLogger(__name__)
TEMP_KINDS = ("tmp", "work", "old")
_TEMP_RE = re.compile(r"^\..+\.(?:tmp|work|old)-(?P<pid>\d+)(?:-.*)?$")
# errors that mean "this place cannot take the output" (not a bug, not a bad input file)
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                errno.EFBIG, errno.EEXIST, errno.EISDIR}
FORCE = "force"  # overwrite=FORCE (--force): replace an existing folder even if secompress did not write it
# what every secompress output holds at its top: one of these files (a run: both of the last pair)
OWN_FILES = ("super_experts.json", "prune_report.json", "quantization_plan.json", "evaluation.json",
             ("manifest.json", "recipe.yaml"))


def written_by_secompress(folder: Path) -> bool:
    """Whether ``folder`` is empty or holds what a secompress output holds (:data:`OWN_FILES`)."""
    names = {p.name for p in folder.iterdir()}
    return not names or any(set((f,) if isinstance(f, str) else f) <= names for f in OWN_FILES)


def check_output_dir(out: str | Path, overwrite: bool | str, inputs=(), root: str | Path | None = None,
                     need_bytes: int = 0) -> Path:
    """``out`` as given, after refusing every output that would replace something it must not.

    Refused: the filesystem root, the home folder, the working directory or any folder above it,
    anything that is or holds one of ``inputs`` (model folder, data files, recipe), a path outside
    ``root`` when one is given (outputs named by a recipe stay under the output root), a symlink,
    and an existing non-directory. An existing directory needs ``overwrite``, and ``overwrite=FORCE``
    ('force') when secompress did not write it (:func:`written_by_secompress`: a thesis folder with
    its ``.git`` is not replaced by a mistyped ``--out``). Then the place must be writable and have
    ``need_bytes`` free (:func:`check_writable`).
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
    if out.exists() and overwrite != FORCE and not written_by_secompress(out):
        raise OutputExistsError(f"refusing to replace '{out}': secompress did not write it (no "
                                f"{', '.join(f if isinstance(f, str) else ' + '.join(f) for f in OWN_FILES)}); "
                                f"pass overwrite='{FORCE}' (--force) to replace it anyway")
    check_writable(out, need_bytes)
    return out


def check_writable(out: str | Path, need_bytes: int = 0) -> None:
    """Fail now, not after hours of compute, if ``out`` cannot be created: a file where a parent folder
    must be, a read-only or unwritable place, or less than ``need_bytes`` free on its filesystem."""
    out = Path(out).absolute()
    probe = out.parent
    while not probe.exists() and not probe.is_symlink():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputWriteError(f"cannot create output '{out}': '{probe}' is a file, not a folder")
    try:  # os.access ignores read-only mounts for root; a real file says it
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputWriteError(f"cannot write output '{out}': '{probe}' is not writable ({e.strerror})") from None
    free = shutil.disk_usage(probe).free
    if need_bytes > free:
        raise OutputWriteError(f"not enough free space for output '{out}': about {_gib(need_bytes)} needed, "
                               f"{_gib(free)} free in '{probe}'; free space or choose another --out")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def checkpoint_bytes(model: str | Path) -> int:
    """Bytes of a local checkpoint's safetensors (0 for a hub id: its size is not known here)."""
    p = Path(model)
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else 0


_TEMP_PART = re.compile(r"\.(.+)\.(?:%s)-\d+-[^/]+" % "|".join(TEMP_KINDS))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(folder: str | Path) -> list[Path]:
    """Remove the ``.NAME.{tmp,work,old}-PID-*`` temporaries in ``folder`` whose process is dead."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP_RE.match(p.name)
        if m is None or int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError as e:
            log.warning("could not remove the stale temporary '%s': %s", p, e.strerror)
            continue
        log.info("removed '%s', left by a process that no longer runs", p)
        removed.append(p)
    return removed


def final_path(path: str | Path) -> Path:
    """``path`` as it will be named once its temporary folders are renamed (``.NAME.tmp-PID-X/model`` ->
    ``NAME/model``): what messages written from inside :func:`atomic_dir` show the user."""
    parts = [m.group(1) if (m := _TEMP_PART.fullmatch(part)) else part for part in Path(path).parts]
    return Path(*parts)


def make_temp_dir(parent: str | Path, name: str, kind: str) -> Path:
    """A new ``.NAME.KIND-PID-RANDOM`` folder in ``parent`` with ordinary (umask) permissions."""
    assert kind in TEMP_KINDS, kind
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary directory
    return tmp


@contextmanager
def temp_dir(parent: str | Path, name: str, kind: str = "work"):
    """A scratch folder beside an output, removed when the block ends however it ends."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    sweep_stale(parent)
    with write_errors(Path(parent) / name):
        tmp = make_temp_dir(parent, name, kind)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_write_error(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in WRITE_ERRNOS
    # safetensors reports I/O errors as its own exception type with the OS message inside
    return type(e).__name__ == "SafetensorError" and any(
        s in str(e) for s in ("No space left", "Read-only file system", "Permission denied", "Disk quota"))


@contextmanager
def write_errors(out: Path):
    """Turn a failed write (disk full, read-only, permission) inside the block into one
    :class:`OutputWriteError` naming ``out``."""
    try:
        yield
    except Exception as e:
        if not is_write_error(e):
            raise
        what = getattr(e, "strerror", None) or str(e).splitlines()[0]
        where = getattr(e, "filename", None)
        raise OutputWriteError(f"could not write output '{out}': {what}" + (f" ('{where}')" if where else "") +
                               "; nothing was written") from None


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside ``out``; it becomes ``out`` only if the block succeeds.

    On any error (SIGTERM and Ctrl-C included, see ``secompress.cli``) the temporary directory is
    removed and an existing ``out`` is untouched. A failed write is an :class:`OutputWriteError`.
    """
    out = check_output_dir(out, overwrite)
    with write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out.parent)
        tmp = make_temp_dir(out.parent, out.name, "tmp")
    try:
        with write_errors(out):
            yield tmp
            old = None
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}-{os.urandom(3).hex()}")
                out.rename(old)
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("wrote %s", out)


def export_size(folder: Path, source_bytes: int) -> dict:
    """Bytes of the export's weight files and their ratio to the source checkpoint's."""
    files = sorted(Path(folder).rglob("*.safetensors"))
    n = sum(f.stat().st_size for f in files)
    return {"bytes": n, "files": len(files), "source_bytes": source_bytes,
            "ratio": round(n / source_bytes, 4) if source_bytes else None}
