import importlib.util
import json
import sys

import pytest

from secompress.data import load_calibration, read_texts
from secompress.errors import CalibrationError, MissingExtraError


def test_builtin_default_is_offline_and_long_enough(tokenizer):
    d = load_calibration("builtin", tokenizer, num_samples=32, seq_len=512)
    assert d.input_ids.shape == (32, 512)
    assert (d.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert d.source == "builtin" and len(d.sha256) == 64


def test_txt_and_jsonl(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": "line %d " % i * 10}) for i in range(20)))
    a = load_calibration(tmp_path / "a.txt", tokenizer, num_samples=4, seq_len=32)
    b = load_calibration(tmp_path / "b.jsonl", tokenizer, num_samples=4, seq_len=32)
    assert a.input_ids.shape == b.input_ids.shape == (4, 32)
    assert a.sha256 != b.sha256


def test_bad_jsonl_points_at_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:2"):
        read_texts(p)


def test_too_little_text(tmp_path, tokenizer):
    (tmp_path / "s.txt").write_text("tiny")
    with pytest.raises(CalibrationError, match="fewer than one window"):
        load_calibration(tmp_path / "s.txt", tokenizer, num_samples=2, seq_len=64)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(CalibrationError, match="not a file"):
        read_texts(tmp_path / "nope.txt")
    (tmp_path / "x.parquet").write_bytes(b"x")
    with pytest.raises(CalibrationError, match=".txt or .jsonl"):
        read_texts(tmp_path / "x.parquet")


def test_hub_dataset_without_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"secompress\[data\]"):
        read_texts("hf:wikitext:wikitext-2-raw-v1:train")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs the data extra")
def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationError, match="Offline"):
        read_texts("hf:secompress-no-such/dataset:train")
