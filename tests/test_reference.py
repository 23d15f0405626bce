"""The shipped reference model (evals/reference/model): loads offline, matches its recorded figures."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "evals" / "reference" / "model"
sys.path.insert(0, str(ROOT / "evals" / "reference"))


@pytest.fixture(scope="module")
def figures():
    from corpus import load_corpus

    fig = json.loads((MODEL / "figures.json").read_text())
    if load_corpus().sha256 != fig["corpus_sha256"]:
        pytest.skip("this Python's standard library differs from the recorded corpus: figures not comparable")
    return fig


@pytest.fixture(scope="module")
def model():
    from secompress.checkpoints import load_model

    return load_model(MODEL)


def test_loads_offline_with_plain_transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    m = AutoModelForCausalLM.from_pretrained(MODEL)
    assert len(tok) == 259 and tok("def f():")["input_ids"] == [256] + list(b"def f():")
    assert m.config.model_type == "qwen3_moe" and m.config.num_experts == 16
    size = sum(f.stat().st_size for f in MODEL.glob("*.safetensors"))
    assert size <= 40 * 2**20
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([tok("import os")["input_ids"]])).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == m.config.vocab_size


def test_heldout_loss_matches_the_recorded_value(model, figures):
    from accept import heldout_windows

    from secompress.perplexity import mean_loss

    ids = heldout_windows(48, 512, offset=32 * 511)
    assert mean_loss(model, ids) == pytest.approx(figures["heldout_loss_nats_per_byte"], rel=2e-3)


def test_profiler_finds_the_recorded_super_experts(model, figures):
    from accept import heldout_windows

    from secompress.data import CalibrationData
    from secompress.profile import ProfileConfig, profile

    calib = CalibrationData(heldout_windows(32, 512), "held-out", "-")
    r = profile(model, data=calib, config=ProfileConfig(num_samples=32, seq_len=512), progress=False)
    assert [list(s) for s in r.se_ids()] == figures["super_experts_paper_rule"]
    assert figures["super_experts_paper_rule"], "the reference model must have a Super Expert"
