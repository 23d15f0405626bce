"""The profile cache: SE profiles kept between runs, keyed by what they were computed from.

The key is made of the weights' identity (a local checkpoint's safetensors headers, sizes and
mtimes; else hub id + revision), the calibration text's hash, the profile settings and the
secompress version: any change gives a new key, so a stale profile is never reused.

The cache is optional and shared: an unwritable or full cache only costs the reuse (a warning,
the run goes on); a corrupt entry is detected (a manifest of sha256 sums, written last) and
recomputed; concurrent writers of one key never collide (each writes its own
``.KEY.tmp-PID-RANDOM`` folder and renames it into place; if the key already exists the first
entry is kept and the later copy discarded), and readers never see a partial entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from .outputs import make_temp_dir, sweep_stale
from .profile import ProfileResult
from .profile_io import load_profile, write_profile

log = logging.getLogger(__name__)
CACHE_ENV = "SECOMPRESS_CACHE"
MANIFEST = "MANIFEST.sha256.json"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "secompress"))


def model_fingerprint(model_id: str, revision: str | None) -> str:
    """Identity of the weights: a local folder's safetensors headers + sizes + mtimes, else id@revision."""
    p = Path(model_id)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(p.glob("*.safetensors")):
            st = f.stat()
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(n, 1 << 22)))
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update((p / "config.json").read_bytes() if (p / "config.json").is_file() else b"")
    else:
        h.update(f"{model_id}@{revision or 'main'}".encode())
    return h.hexdigest()


def profile_key(model_id: str, revision: str | None, dtype: str, data_sha: str, settings) -> str:
    from . import __version__

    blob = json.dumps({"model": model_fingerprint(model_id, revision), "data": data_sha, "profile": repr(settings),
                       "dtype": dtype, "secompress": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ProfileCache:
    """``get(key)`` / ``put(key, result)`` on ``ROOT/profiles/KEY/`` folders."""

    def __init__(self, root: str | Path | None = None):
        self.dir = Path(root if root is not None else cache_root()) / "profiles"

    def path(self, key: str) -> Path:
        return self.dir / key

    def get(self, key: str) -> ProfileResult | None:
        """The cached profile, or None when absent, unreadable or corrupt (a corrupt entry is removed)."""
        path = self.path(key)
        try:
            if not path.is_dir():
                return None
            sums = json.loads((path / MANIFEST).read_text())
            for name, digest in sums.items():
                if _sha256(path / name) != digest:
                    raise ValueError(f"{name} does not match its checksum")
            result = load_profile(path)
        except Exception as e:  # noqa: BLE001 -- any unreadable entry is recomputed, never fatal
            log.warning("profile cache entry '%s' is corrupt or unreadable (%s): recomputing it", path,
                        getattr(e, "strerror", None) or e)
            self._discard(path)
            return None
        log.info("profile cache hit: %s", path)
        return result

    def put(self, key: str, result: ProfileResult) -> bool:
        """Store ``result`` under ``key``; True if the entry exists afterwards. Never raises for a
        cache that cannot be written (the cache is optional): it logs a warning instead."""
        path, tmp = self.path(key), None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            sweep_stale(self.dir)
            tmp = make_temp_dir(self.dir, key, "tmp")
            write_profile(result, tmp, plots=False)
            sums = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps(sums, indent=1))  # last: an entry with it is complete
            try:
                tmp.rename(path)  # atomic; fails if another writer's entry is already there
            except OSError:
                if not (path / MANIFEST).is_file():
                    raise
                log.info("profile cache entry %s was written meanwhile by another run: keeping it", path)
            return True
        except OSError as e:
            log.warning("could not write the profile cache under '%s' (%s): continuing without it", self.dir,
                        e.strerror or e)
            return False
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _discard(self, path: Path) -> None:
        """Move a bad entry out of the way (atomically, so a concurrent reader never sees it half gone)."""
        try:
            dead = make_temp_dir(self.dir, path.name, "old")
            path.rename(dead / "entry")
            shutil.rmtree(dead, ignore_errors=True)
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
