"""Calibration data: a local .txt/.jsonl file, a ``datasets`` name, or the built-in default.

``spec`` forms:
  - ``"builtin"``: ~80 kB of Python source shipped with the package (see data/NOTICE);
  - a path to ``.txt`` (whole text) or ``.jsonl`` (one JSON object per line, field ``text``);
  - ``"hf:NAME[:CONFIG]:SPLIT"``: a Hugging Face dataset, when online (pip extra ``data``).

Texts are tokenized, concatenated and cut into ``[N, S]`` windows; each window starts
with the tokenizer's BOS token when it has one, as the model saw in training.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CalibrationError, require

BUILTIN = Path(__file__).parent / "data" / "calibration.txt"


@dataclass(frozen=True)
class CalibrationData:
    input_ids: torch.Tensor  # [N, S]
    source: str
    sha256: str  # of the raw text, to key caches and to record in reports

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def read_texts(spec: str | Path) -> tuple[list[str], str]:
    """The raw texts of a calibration spec, and a printable description of it."""
    spec = str(spec)
    if spec == "builtin":
        return [BUILTIN.read_text(encoding="utf-8")], "builtin"
    if spec.startswith("hf:"):
        return _read_hub(spec), spec
    path = Path(spec)
    if not path.is_file():
        raise CalibrationError(f"calibration data '{spec}' is not a file, 'builtin', or 'hf:NAME[:CONFIG]:SPLIT'")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CalibrationError(f"{path}:{n}: each line needs a string field 'text'")
            texts.append(obj["text"])
        return texts, str(path)
    if path.suffix in (".txt", ".md", ".py", ""):
        return [path.read_text(encoding="utf-8", errors="replace")], str(path)
    raise CalibrationError(f"calibration file '{path}' must be .txt or .jsonl")


def _utf8(path: Path) -> str:
    """The file's text, or a CalibrationError naming the file and the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CalibrationError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                               "a .jsonl calibration file holds one JSON object per line, UTF-8 encoded") from None


def _read_hub(spec: str) -> list[str]:
    datasets = require("datasets", "data", "Loading calibration data from the Hugging Face Hub")
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3):
        raise CalibrationError(f"'{spec}': expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, missing dataset, bad split: say so plainly
        raise CalibrationError(f"could not load dataset '{name}' ({type(e).__name__}). Offline? "
                               "Pass a local .txt or .jsonl file instead.") from e
    if "text" not in ds.column_names:
        raise CalibrationError(f"dataset '{name}' has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t]


def load_calibration(spec: str | Path, tokenizer, num_samples: int = 32, seq_len: int = 512) -> CalibrationData:
    """Tokenize ``spec`` into at most ``num_samples`` windows of ``seq_len`` tokens."""
    if num_samples < 1 or seq_len < 2:
        raise CalibrationError("num_samples must be >= 1 and seq_len >= 2")
    texts, source = read_texts(spec)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"calibration data '{source}' is empty")
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - 1 if bos is not None else seq_len
    ids: list[int] = []
    for t in texts:
        for i in range(0, len(t), 4096):  # pieces: keeps tokenizers' max-length warnings away
            ids.extend(tokenizer(t[i : i + 4096], add_special_tokens=False)["input_ids"])
            if len(ids) >= body * num_samples:
                break
        if len(ids) >= body * num_samples:
            break
    n = min(num_samples, len(ids) // body)
    if n == 0:
        raise CalibrationError(f"calibration data '{source}' has {len(ids)} tokens, fewer than one "
                               f"window of {body}; use a shorter seq_len or more text")
    windows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)  # [N, body]
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)  # [N, S]
    return CalibrationData(windows, source, digest)
