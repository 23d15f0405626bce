import copy
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ARCHS
from secompress.cli import main
from secompress.errors import CalibrationError, MissingExtraError
from secompress.profile import ProfileResult
from secompress.quant import (QuantConfig, QuantizedExperts, QuantizedLinear, QuantPlan, Rule,
                              all_expert_calibration, allocate, check_coverage, dequantize, load_quantized, quantize,
                              quantize_, resolve_plan, save_quantized)
from secompress.quant.api import PLAN_NAME, codes_file
from secompress.quant.backends import exporter
from secompress.quant.backends.base import layer_uniformity
from secompress.quant.rtn import BITS, pack, unpack
from secompress.se_rule import SERule
from secompress.testing import make_tiny, plant_super_expert

SE = (1, 3)  # planted Super Expert of the tiny Qwen3-MoE
EXP = "model.layers.{}.mlp.experts.{}"


def fake_profile(model, ses=(SE,), zero=()):
    """A ProfileResult with given SEs and routed-token counts (100 each, 0 for ``zero``)."""
    L, E = model.config.num_hidden_layers, model.config.num_local_experts
    tokens = np.full((L, E + 1), 100, dtype=np.int64)
    tokens[:, E] = -1
    tokens[2, :E] = np.arange(E) * 10 + 1  # varied importance in layer 2
    for l, e in zero:
        tokens[l, e] = 0
    return ProfileResult(model="tiny", model_type=model.config.model_type, num_experts=E,
                         moe_layers=list(range(L)), has_shared=False, rule=SERule(), data_source="test",
                         data_sha256="", num_tokens=0, arrays={"tokens": tokens, "hidden_max": np.ones(L)},
                         super_experts=list(ses))


@pytest.fixture(scope="module")
def base():
    m = make_tiny("qwen3_moe")
    plant_super_expert(m, *SE)
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(0))


# ---- RTN math ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_within_half_scale(bits, symmetric):
    w = torch.randn(3, 8, 64) * torch.logspace(-2, 1, 64)  # a batch of experts, uneven columns
    w[0, 0, :32] = 0  # an all-zero group
    qt = quantize(w, bits, 32, symmetric)
    assert qt.codes.dtype == torch.uint8 and qt.zeros.dtype == torch.uint8
    assert qt.codes.shape == w.shape and qt.scales.shape == (3, 8, 2)
    assert int(qt.codes.max()) <= 2 ** bits - 1 and int(qt.zeros.max()) <= 2 ** bits - 1
    err = (w - dequantize(qt)).abs().reshape(3, 8, 2, 32)
    bound = qt.scales.float()[..., None] / 2
    assert (err <= bound * (1 + 1e-6) + 1e-12).all()
    assert len(torch.unique(qt.codes)) > 2 ** bits // 2  # the range is actually used
    assert torch.equal(unpack(pack(qt.codes, bits), bits, tuple(qt.codes.shape)), qt.codes)
    assert pack(qt.codes, bits).numel() == qt.codes.numel() * bits // 8


def test_rtn_rejects_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(torch.randn(4, 64), 5, 32)
    with pytest.raises(ValueError, match=r"group_size 48 does not divide the 64"):
        quantize(torch.randn(4, 64), 4, 48)


# ---- plan --------------------------------------------------------------------------------------
def test_plan_resolution_order(base):
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    rules = [Rule(r"model\.layers\.\d+\.self_attn\.q_proj", 2, regex=True), Rule(q0, 8),
             Rule(r".*o_proj", None, regex=True), Rule(r".*proj", 3, regex=True)]
    p = resolve_plan(base, rules, ses=(), default=4)
    assert p.bits[q0] == 8 and p.source[q0] == "exact"  # exact beats an earlier regex
    assert p.bits[q1] == 2 and p.source[q1] == "regex"  # first matching regex wins
    assert p.bits["model.layers.2.self_attn.o_proj"] is None  # None keeps 16-bit
    assert p.bits["model.layers.2.self_attn.k_proj"] == 3
    assert p.bits[EXP.format(0, 0)] == 4 and p.source[EXP.format(0, 0)] == "default"  # 'proj' is no substring match
    assert all(n in p.bits for n in (EXP.format(3, 7), "model.layers.3.self_attn.v_proj"))
    assert not any("gate" in n.rsplit(".", 1)[-1] for n in p.bits)  # routers are never quantized
    with pytest.raises(ValueError, match="names no quantizable weight"):
        resolve_plan(base, [Rule("model.layers.0.self_attn.q", 8)])
    assert QuantPlan.from_json(json.loads(json.dumps(p.to_json()))).bits == p.bits


@pytest.mark.parametrize("mode", ["expert", "layer"])
def test_se_modes(base, mode):
    p = resolve_plan(base, [Rule(EXP.format(*SE), 2)], ses=[SE], se_mode=mode, se_bits=8, default=4,
                     meta={"method": "rtn", "format": "dequantized"})
    assert p.bits[EXP.format(*SE)] == 8  # protection overrides a lower rule
    others = {p.bits[EXP.format(1, e)] for e in range(8) if e != SE[1]}
    assert others == ({4} if mode == "expert" else {8})
    assert {p.bits[EXP.format(2, e)] for e in range(8)} == {4}
    assert p.bits["model.layers.1.self_attn.q_proj"] == 4
    compat = exporter(p.meta).compatibility(p)  # method rtn, format dequantized: a 16-bit export
    assert compat["transformers"][0] and not compat["gptqmodel"][0] and compat["vllm-fused-moe"][0]
    assert "index" in compat["vllm-fused-moe"][1]  # the writer's index keeps vLLM off the codes file (quant.compat)
    gp = resolve_plan(base, [Rule(EXP.format(*SE), 2)], ses=[SE], se_mode=mode, se_bits=8,
                      meta={"method": "gptq", "format": "dequantized"})
    assert exporter(gp.meta).compatibility(gp) == compat  # GPTQ's codes export as RTN's do
    assert layer_uniformity(gp)[0] == (mode == "layer")  # fused-MoE kernels take one format per layer
    assert "1: 4/8" in layer_uniformity(gp)[1] or mode == "layer"
    p16 = resolve_plan(base, [], ses=[SE], se_mode=mode, se_bits=None)
    assert p16.bits[EXP.format(*SE)] is None


# ---- quantize_, export, reload -----------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(base, tmp_path_factory, tokenizer, ids):
    m = copy.deepcopy(base)
    keep = "model.layers.0.self_attn.o_proj"
    o_proj = m.get_submodule(keep)
    cfg = QuantConfig(bits=4, group_size=32, se_bits=None, format="dequantized", rules=(Rule(keep, None),))
    plan = quantize_(m, cfg, profile=fake_profile(m))
    out = save_quantized(m, tokenizer, plan, tmp_path_factory.mktemp("q") / "out")
    with torch.no_grad():
        logits = m(ids).logits
    return m, plan, out, logits, o_proj


def test_quantize_keeps_ses_and_quantizes_the_rest(base, quantized):
    m, plan, _, logits, o_proj = quantized
    assert m.get_submodule("model.layers.0.self_attn.o_proj") is o_proj  # planned None: untouched
    assert torch.equal(o_proj.weight, base.model.layers[0].self_attn.o_proj.weight)
    ref = base.model.layers[1].mlp.experts
    qe = m.model.layers[1].mlp.experts
    assert isinstance(qe, QuantizedExperts)  # fused: stacked codes, the SE 16-bit
    assert qe.qtensor(SE[1], "down_proj") is None and qe.dense_experts.tolist() == [SE[1]]
    w = qe.fused_weights()
    assert torch.equal(w["down_proj"][SE[1]], ref.down_proj[SE[1]])  # bit-identical
    assert torch.equal(w["gate_up_proj"][SE[1]], ref.gate_up_proj[SE[1]])
    assert qe.g0_down_proj_codes.shape == (7, 64, 16) and qe.g0_down_proj_codes.dtype == torch.uint8  # 2 per byte
    q = qe.qtensor(0, "down_proj")
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    assert not any(p.dtype.is_floating_point and p.dim() >= 2 for p in qe.parameters())  # no float weight kept
    err = (w["down_proj"][0] - ref.down_proj[0]).abs().reshape(64, 1, 32)
    assert (err <= q.scales.float()[..., None] / 2 * (1 + 1e-6)).all() and err.max() > 0
    assert torch.equal(w["down_proj"][0], dequantize(q))
    assert isinstance(m.model.layers[2].self_attn.q_proj, QuantizedLinear)
    assert torch.isfinite(logits).all()


def test_reload_with_stock_transformers_in_fresh_process(base, quantized, ids, tmp_path):
    _, plan, out, logits, _ = quantized
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == cfg["num_local_experts"] == 8  # both key spellings
    assert json.loads((out / PLAN_NAME).read_text())["modules"] and codes_file(out) is not None
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): logits = m(ids).logits\n"
        f"torch.save({{'logits': logits, 'down': m.model.layers[1].mlp.experts.down_proj.detach().clone()}}, "
        f"{str(tmp_path / 'r.pt')!r})\n"
        "assert not any(k.startswith('secompress') for k in sys.modules)\n")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=600)
    r = torch.load(tmp_path / "r.pt")
    assert torch.isfinite(r["logits"]).all()
    torch.testing.assert_close(r["logits"], logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(r["down"][SE[1]], base.model.layers[1].mlp.experts.down_proj[SE[1]])  # SE bit-identical
    assert not torch.equal(r["down"][0], base.model.layers[1].mlp.experts.down_proj[0])


def test_load_quantized_rebuilds_real_modules(quantized, ids, base):
    m, plan, out, logits, _ = quantized
    m2, plan2 = load_quantized(out)
    assert plan2.bits == plan.bits
    assert isinstance(m2.model.layers[1].mlp.experts, QuantizedExperts)
    assert torch.equal(m2.model.layers[1].mlp.experts.qtensor(0, "down_proj").codes,
                       m.model.layers[1].mlp.experts.qtensor(0, "down_proj").codes)
    assert torch.equal(m2.model.layers[1].mlp.experts.fused_weights()["down_proj"][SE[1]],
                       base.model.layers[1].mlp.experts.down_proj[SE[1]])
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_exports(arch, tmp_path, ids):
    from transformers import AutoModelForCausalLM

    m = make_tiny(arch)
    plan = quantize_(m, QuantConfig(bits=3, group_size=None, symmetric=True, protect_super_experts=False,
                                    format="dequantized"))
    assert plan.avg_bits(True) == 3
    save_quantized(m, None, plan, tmp_path / "o")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    with torch.no_grad():
        torch.testing.assert_close(r(ids).logits, m(ids).logits, atol=1e-4, rtol=1e-4)


# ---- rejected input ----------------------------------------------------------------------------
def test_bad_config_and_input_rejected(base, monkeypatch):
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="se_bits"):
        QuantConfig(se_bits=4)
    m = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"group_size 48 does not divide the 64"):
        quantize_(m, QuantConfig(group_size=48), profile=fake_profile(m))
    assert not any(isinstance(x, (QuantizedLinear, QuantizedExperts)) for x in m.modules())  # unchanged
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingExtraError, match=r"secompress\[bnb\]"):
        quantize_(m, QuantConfig(method="bnb", group_size=32), profile=fake_profile(m))
    with pytest.raises(ValueError, match="smallest candidate is 2"):
        quantize_(m, QuantConfig(format="dequantized", group_size=32, avg_bits=1.5), profile=fake_profile(m))
    with pytest.raises(ValueError, match="pinned"):  # 1 of 32 experts at 16 bits: at least 2.4375
        quantize_(m, QuantConfig(format="dequantized", group_size=32, avg_bits=2.3), profile=fake_profile(m))
    with pytest.raises(MissingExtraError, match=r"secompress\[dev\]"):
        monkeypatch.setitem(sys.modules, "scipy", None)
        monkeypatch.setitem(sys.modules, "scipy.optimize", None)
        allocate([1, 2], [1, 1], target=3)


# ---- allocation --------------------------------------------------------------------------------
def test_allocation_hits_target_and_pins():
    rng = np.random.default_rng(0)
    imp, par = rng.random(24) * 100, np.full(24, 1000)
    for target in (2.6, 3.0, 3.5, 4.5):
        a = allocate(imp, par, (2, 3, 4, 8, 16), target, pinned={5: 16})
        assert a.bits[5] == 16
        assert target - 1 <= a.average <= target + 1e-9  # within one bit-step below the budget
        order = np.argsort(imp)
        free = [b for i, b in enumerate(np.array(a.bits)[order]) if order[i] != 5]
        assert free == sorted(free)  # more important experts never get fewer bits


def test_quantize_with_avg_bits_pins_ses(base):
    m = copy.deepcopy(base)
    plan = quantize_(m, QuantConfig(format="dequantized", group_size=32, avg_bits=3.5, se_bits=None), profile=fake_profile(m))
    assert plan.bits[EXP.format(*SE)] is None and plan.source[EXP.format(*SE)] == "se"
    assert 2.5 <= plan.avg_bits(experts_only=True) <= 3.5
    assert plan.meta["allocation"]["average"] == pytest.approx(plan.avg_bits(experts_only=True))
    assert plan.bits[EXP.format(2, 7)] >= plan.bits[EXP.format(2, 0)]  # 71 tokens vs 1
    lp = quantize_(copy.deepcopy(base), QuantConfig(format="dequantized", group_size=32, avg_bits=4, se_mode="layer", se_bits=8),
                   profile=fake_profile(base))
    assert {lp.bits[EXP.format(1, e)] for e in range(8)} == {8}  # the SE's layer 8-bit as a whole
    assert "the index names the model shards only" in lp.compatibility()["vllm-fused-moe"][1]  # dequantized


# ---- coverage ----------------------------------------------------------------------------------
def test_uncalibrated_expert_needs_fallback(base):
    prof = fake_profile(base, zero=[(2, 5)])
    with pytest.raises(CalibrationError, match=r"\(2, 5\)"):
        check_coverage(prof)
    assert check_coverage(prof, fallback="rtn") == [(2, 5)]
    with pytest.raises(CalibrationError, match="fallback='rtn'"):
        quantize_(copy.deepcopy(base), QuantConfig(format="dequantized", group_size=32, avg_bits=3.5), profile=prof)
    plan = quantize_(copy.deepcopy(base), QuantConfig(format="dequantized", group_size=32, avg_bits=3.5, fallback="rtn"), profile=prof)
    assert plan.source[EXP.format(2, 5)] == "fallback" and plan.bits[EXP.format(2, 5)] == 4


@pytest.mark.parametrize("defuse", [False, True])
def test_all_expert_calibration_keeps_output(base, ids, defuse):
    from secompress.adapters import get_adapter
    from secompress.layout import defuse_model

    m = copy.deepcopy(base)
    if defuse:
        defuse_model(m, get_adapter(m.config))
    seen = {}
    hooks = []
    if defuse:
        for i, layer in enumerate(m.model.layers):
            for e, pe in enumerate(layer.mlp.experts.per_expert):
                hooks.append(pe.down_proj.register_forward_hook(
                    lambda mod, a, o, k=(i, e): seen.__setitem__(k, seen.get(k, 0) + a[0].shape[0])))
    with torch.no_grad():
        ref = m(ids).logits
        obs = []
        seen.clear()
        with all_expert_calibration(m, observer=lambda l, e, x, act, y, routed: obs.append((l, e, x.shape[0]))) as st:
            out = m(ids).logits
        inside = dict(seen)
        after = m(ids).logits
    T = ids.numel()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, ref)  # restored
    assert all((st.tokens[l] == T).all() for l in range(4)) and len(st.tokens) == 4
    assert len(obs) == 32 and all(n == T for _, _, n in obs)
    if defuse:
        assert len(inside) == 32 and set(inside.values()) == {T}


# ---- CLI ---------------------------------------------------------------------------------------
def test_cli_quantize(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["quantize", str(tiny_dir("qwen3_moe")), "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--se-bits", "8", "--se-mode", "layer", "--symmetric", "--dtype", "float32", "--num-samples", "8",
            "--seq-len", "64", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "compressed-tensors" in printed and re.search(r"\nvllm +yes", printed)  # the export's report
    plan = json.loads((out / PLAN_NAME).read_text())
    assert plan["se_mode"] == "layer" and plan["se_bits"] == 8
    assert main(args) == 2  # exists, no --overwrite
    assert main(args[:-2] + ["--group-size", "48", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
