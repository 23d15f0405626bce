"""The sink-health gate in streamed runs: the layer-by-layer engine measures the same per-layer
statistics as :func:`secompress.sink.measure_sink` in memory, and a streamed recipe with
``evaluate.sink_check`` fails, leaving nothing behind, when the Super Expert is lost.

What "the same" means here. The statistics are reduced over the same rows in the same batches of
``SINK_BATCH_SIZE`` windows either way (:mod:`secompress.sink_meter`), but the decoder layers that
produce those rows run on the engine's chunks, which may hold another number of windows than
measure_sink's forwards. A float32 matrix product over ``B x S`` rows may then be computed by
another kernel, summing its K terms in another order: the results differ in the last bits, by
how much depends on the CPU (AVX-512 and AVX2 kernels block differently; an AMD EPYC gives
0.4310431182 where this machine gives 0.4310432374). So:

- bit-identical when every layer ran on the same batch shapes (engine chunk = ``SINK_BATCH_SIZE``):
  the same operations in the same order give the same bits on any one machine;
- otherwise within ``rtol = L * K * eps``: eps = float32's machine epsilon (2**-23), K the longest
  sum a decoder layer computes (hidden size, FFN widths, head dim or sequence length), L the
  decoder layers. A sum of K float32 terms in two orders differs by at most about K * eps
  relative to the sum of magnitudes, and the L layers add their differences. That is ~3e-5
  for the tiny models: 100x the differences seen across CPUs, far below what a lost Super
  Expert or a wrong batch changes (the peak ratio drops by orders of magnitude).
"""
import json
import math
import re

import pytest
import torch
from test_merge import _bos_super_expert_model

from secompress.checkpoints import load_model
from secompress.quant.api import QuantConfig, quantize_
from secompress.sink import SINK_BATCH_SIZE, SinkHealthError, measure_sink
from secompress.sink_meter import SinkMeter, _Regroup
from secompress.compress import Job
from secompress.testing import make_tiny, plant_super_expert, save_tiny
from test_streamed import streamed

EPS32 = torch.finfo(torch.float32).eps


def reorder_rtol(config, seq_len: int) -> float:
    """L * K * eps (the module docstring): how far two summation orders may move a statistic."""
    widths = [config.hidden_size, seq_len, getattr(config, "head_dim", None) or 0]
    widths += [getattr(config, k, None) or 0 for k in ("intermediate_size", "moe_intermediate_size",
                                                       "shared_expert_intermediate_size")]
    return config.num_hidden_layers * max(widths) * EPS32


def _close(p: float, q: float, rtol: float) -> bool:
    if math.isnan(p) or math.isnan(q):
        return math.isnan(p) and math.isnan(q)
    return p == q if rtol == 0 else math.isclose(p, q, rel_tol=rtol, abs_tol=0.0)


def _same(a, b, rtol: float = 0.0) -> None:
    """Per-layer statistics of two SinkHealth: bit-identical (rtol 0) or within rtol."""
    for name in ("hidden_max", "hidden_first_max", "hidden_median", "sink_mass"):
        x, y = getattr(a, name), getattr(b, name)
        assert len(x) == len(y) and all(_close(p, q, rtol) for p, q in zip(x, y)), (name, x, y, rtol)


def test_reorder_tolerance_separates_summation_order_from_a_real_change():
    cfg = make_tiny("mixtral", num_hidden_layers=3).config
    rtol = reorder_rtol(cfg, 24)
    assert rtol == 3 * 64 * 2.0 ** -23  # 3 layers x the hidden size 64 (the longest sum) x eps: 2.3e-5
    assert _close(0.4310431182, 0.4310432374, rtol)  # the two CPUs' results of issue 23
    assert not _close(0.4310431182, 0.4310431182 * (1 + 1e-3), rtol)


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
# 8 > N: one chunk holds both batches). The reductions see the same rows in the same batches of 4
# (secompress.sink_meter); the layers ran on the same batch shapes only when chunk == 4: bit-identical
# then, within reorder_rtol otherwise (the module docstring).
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
    rtol = 0.0 if chunk == SINK_BATCH_SIZE else reorder_rtol(m.config, ids.shape[1])
    _same(res.sink_before, base, rtol)
    _same(res.sink_after, comp, rtol)
    assert all(math.isfinite(x) for x in base.sink_mass) and base.peak_ratio > 1
    only = go(ids, progress=False, sink=True, baseline=False)  # the SE-unaware pass's way
    assert only.sink_before is None
    _same(only.sink_after, res.sink_after)  # the same pass, chunks and shapes: bit-identical
    _same(only.sink_after, comp, rtol)
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
    # the streamed layers ran on chunks of 2 windows (data.batch_size), measure_sink's on batches of 4
    rtol = reorder_rtol(load_model(bos_se_checkpoint).config, 64)
    _close_json(json.loads((st.out / "sink.json").read_text()), json.loads((mem.out / "sink.json").read_text()), rtol)
    _close_markdown((st.out / "sink.md").read_text(), (mem.out / "sink.md").read_text(), rtol)
    sink = {k: v for k, v in st.comparison.rows.items() if k.startswith("sink/")}
    assert sink
    _close_json(sink, {k: v for k, v in mem.comparison.rows.items() if k.startswith("sink/")}, rtol)
    cols = json.loads((st.out / "sink.json").read_text())
    assert list(cols) == ["baseline", "SE-aware", "SE-unaware"]
    assert cols["SE-aware"]["peak_massive_ratio"] >= 0.5 * cols["baseline"]["peak_massive_ratio"]  # gate passed


def _close_json(a, b, rtol: float, at: str = "") -> None:
    """The same structure; numbers within rtol (the module docstring), everything else equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), at
        for k in a:
            _close_json(a[k], b[k], rtol, f"{at}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), at
        for i, (x, y) in enumerate(zip(a, b)):
            _close_json(x, y, rtol, f"{at}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert _close(a, float(b), rtol), (at, a, b)
    else:
        assert a == b, (at, a, b)


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _close_markdown(a: str, b: str, rtol: float) -> None:
    """The same table text around the numbers; each number (printed to 4 significant digits) within rtol or
    one unit of its last printed digit."""
    assert NUMBER.sub("#", a) == NUMBER.sub("#", b)
    for x, y in zip(NUMBER.findall(a), NUMBER.findall(b)):
        if "." not in x and "e" not in x:  # layer numbers
            assert x == y
            continue
        digits = x.split("e")[0].partition(".")[2]
        unit = 10.0 ** (-len(digits)) * (10.0 ** int(x.split("e")[1]) if "e" in x else 1.0)
        assert abs(float(x) - float(y)) <= max(rtol * abs(float(y)), unit), (x, y)


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
