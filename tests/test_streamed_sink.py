"""The sink-health gate in streamed runs: the layer-by-layer engine measures the same per-layer
statistics as :func:`secompress.sink.measure_sink` in memory (bit for bit), and a streamed
recipe with ``evaluate.sink_check`` fails, leaving nothing behind, when the Super Expert is lost."""
import json
import math

import pytest
import torch
from test_merge import _bos_super_expert_model

from secompress.checkpoints import load_model
from secompress.quant.api import QuantConfig, quantize_
from secompress.sink import SinkHealthError, measure_sink
from secompress.sink_meter import SinkMeter, _Regroup
from secompress.compress import Job
from secompress.testing import make_tiny, plant_super_expert, save_tiny
from test_streamed import streamed


def _same(a, b) -> None:
    for name in ("hidden_max", "hidden_first_max", "hidden_median", "sink_mass"):
        x, y = getattr(a, name), getattr(b, name)
        assert len(x) == len(y) and all(p == q or (math.isnan(p) and math.isnan(q)) for p, q in zip(x, y)), \
            (name, x, y)


def test_regroup_hands_on_rows_in_batches_of_the_given_size():
    got = []
    g = _Regroup(4, lambda x: got.append(x.tolist()))
    for piece in (torch.arange(3), torch.arange(3, 6), torch.arange(6, 13)):
        g.add(piece)
    g.flush()
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12]]
    assert g.rows == 0 and not g.pending
    with pytest.raises(ValueError, match="batch_size"):
        SinkMeter(2, batch_size=0)


# chunk: windows per engine chunk; measure_sink's batches are of 4 windows (3: they straddle two chunks,
# 8 > N: one chunk holds both batches). Bit-identical: the same rows go through the same layers in the
# same batches of 4 and the same reductions (secompress.sink_meter).
@pytest.mark.parametrize("model_type, chunk", [("qwen2_moe", 3), ("deepseek_v3", 3), ("mixtral", 8),
                                               ("gpt_oss", 4)])
def test_streamed_sink_equals_in_memory(tmp_path, model_type, chunk):
    m = make_tiny(model_type, num_hidden_layers=3)
    plant_super_expert(m, 1, 3)
    src = save_tiny(m, tmp_path / "in")
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))  # [N, S]
    model = load_model(src, torch.float32)
    qc = QuantConfig(bits=4, group_size=8, format="dequantized", protect_super_experts=False)
    base = measure_sink(model, ids)
    quantize_(model, qc)
    comp = measure_sink(model, ids)

    _, go = streamed(src, Job(quant=qc, batch_size=chunk))
    res = go(ids, progress=False, sink=True)
    _same(res.sink_before, base)
    _same(res.sink_after, comp)
    assert all(math.isfinite(x) for x in base.sink_mass) and base.peak_ratio > 1
    only = go(ids, progress=False, sink=True, baseline=False)  # the SE-unaware pass's way
    assert only.sink_before is None
    _same(only.sink_after, comp)
    assert go(ids, progress=False).sink_after is None


RECIPE = """\
version: 1
name: tiny-sink
model: {{id: {model}, model_type: qwen3_moe, streaming: {streaming}}}
data: {{num_samples: 4, seq_len: 64, batch_size: 2, eval_samples: 6}}
stages:
  - profile: {{}}
  - prune: {{ratio: 0.5, method: frequency}}
  - evaluate: {{perplexity: true, compare_se_unaware: {compare}, sink_check: 0.5}}
  - export: {{}}
"""


@pytest.fixture
def bos_se_checkpoint(tmp_path, monkeypatch):
    """A saved qwen3_moe whose layer-1 Super Expert (the expert <bos> goes to) writes the massive
    activation, and a fresh profile cache."""
    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    model, _ = _bos_super_expert_model()
    return save_tiny(model, tmp_path / "tiny")


def _run(src, out, streaming: bool, compare: bool):
    from secompress.recipe.run import run_recipe
    from secompress.recipe.schema import parse_recipe

    text = RECIPE.format(model=src, streaming=str(streaming).lower(), compare=str(compare).lower())
    return run_recipe(parse_recipe(text, "t.yaml"), text, out, progress=False)


def test_streamed_recipe_sink_files_and_rows_equal_the_in_memory_run(tmp_path, bos_se_checkpoint):
    mem = _run(bos_se_checkpoint, tmp_path / "mem", streaming=False, compare=True)
    st = _run(bos_se_checkpoint, tmp_path / "st", streaming=True, compare=True)
    assert mem.manifest["mode"] == "in memory" and st.manifest["mode"] == "streamed"
    for f in ("sink.json", "sink.md", "sink.png"):
        assert (st.out / f).is_file(), f
    assert (st.out / "sink.json").read_text() == (mem.out / "sink.json").read_text()
    assert (st.out / "sink.md").read_text() == (mem.out / "sink.md").read_text()
    sink = {k: v for k, v in st.comparison.rows.items() if k.startswith("sink/")}
    assert sink and sink == {k: v for k, v in mem.comparison.rows.items() if k.startswith("sink/")}
    cols = json.loads((st.out / "sink.json").read_text())
    assert list(cols) == ["baseline", "SE-aware", "SE-unaware"]
    assert cols["SE-aware"]["peak_massive_ratio"] >= 0.5 * cols["baseline"]["peak_massive_ratio"]  # gate passed


def test_streamed_recipe_sink_check_fails_before_anything_is_written(tmp_path, bos_se_checkpoint, monkeypatch):
    from secompress.prune.methods.score import KeepExperts

    se = _bos_super_expert_model()[1]
    real = KeepExperts.on_layer

    def prune_and_lose_the_se(self, index, layer, inputs):  # the compressed stream sees layer 1 without its SE
        if index == 1:
            ad = self.src.adapter
            with torch.no_grad():
                ad.experts_of(ad.block_of(layer)).down_proj[se].zero_()
        real(self, index, layer, inputs)

    monkeypatch.setattr(KeepExperts, "on_layer", prune_and_lose_the_se)
    with pytest.raises(SinkHealthError, match="SE-aware model lost its attention sink"):
        _run(bos_se_checkpoint, tmp_path / "bad", streaming=True, compare=True)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
