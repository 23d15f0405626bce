"""The reference model's corpus: the Python standard library's own source.

Every machine with CPython has it, and it is under the PSF licence. Files are split
into train / held-out by a hash of their relative path (about 2% held out), so the
split does not depend on file order or on which other files exist. The corpus hash
(sha256 over sorted relative paths and contents) is recorded with every run: a
different Python version gives a different hash, and the figures are then not
comparable.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

HELDOUT_EVERY = 50  # a file is held out when sha1(relpath) % HELDOUT_EVERY == 0
# held-out files that make up secompress/data/calibration.txt: calibration, never evaluation
CALIBRATION_FILES = ("contextlib.py", "_strptime.py", "multiprocessing/heap.py", "sunau.py")


def stdlib_dir() -> Path:
    return Path(os.path.dirname(os.__file__))


def _is_heldout(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # [N] uint8 byte stream
    heldout: torch.Tensor  # [M] uint8 byte stream
    heldout_files: tuple[str, ...]
    sha256: str
    n_files: int


def list_files(root: Path | None = None) -> list[tuple[str, Path]]:
    root = root or stdlib_dir()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or "/site-packages/" in rel:
            continue
        out.append((rel, p))
    return out


def load_corpus(root: Path | None = None) -> Corpus:
    h = hashlib.sha256()
    train, held, held_names = [], [], []
    files = list_files(root)
    for rel, p in files:
        data = p.read_bytes()
        h.update(rel.encode() + b"\0" + data + b"\0")
        (held if _is_heldout(rel) else train).append(data + b"\n")
        if _is_heldout(rel):
            held_names.append(rel)
    as_t = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return Corpus(as_t(train), as_t(held), tuple(held_names), h.hexdigest(), len(files))


def heldout_texts(root: Path | None = None, max_files: int | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of the held-out files, for evaluation tasks."""
    out = []
    for rel, p in list_files(root):
        if _is_heldout(rel):
            out.append((rel, p.read_text(encoding="utf-8", errors="replace")))
            if max_files and len(out) >= max_files:
                break
    return out
