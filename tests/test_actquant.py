"""Fake-quantized modules, calibration statistics, smoothing and the compressed-tensors layout of schemes."""
import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")
from safetensors.torch import load_file  # noqa: E402

from secompress.adapters import get_adapter  # noqa: E402
from secompress.quant.actapply import apply_scheme  # noqa: E402
from secompress.quant.actquant import (FakeQuantExperts, FakeQuantLinear, layer_assignment, layer_swapped,  # noqa: E402
                                       swap_layer)
from secompress.quant.actstats import collect_layer, static_input_scales  # noqa: E402
from secompress.quant.ct_schemes import layer_tensors, read_layer, scheme_config  # noqa: E402
from secompress.quant.plan import resolve_plan  # noqa: E402
from secompress.quant.schemes import get_scheme  # noqa: E402
from secompress.quant.smooth_math import aggregate, gap_split, outlier_factor, smoothquant_factor  # noqa: E402
from secompress.quant.smoothing import SmoothConfig, smooth_layer  # noqa: E402
from secompress.testing import make_tiny  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "llmc_actquant"
LLMC_SCHEMES = ["FP8", "FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "NVFP4", "MXFP4"]


def _ids(n=4, s=24, seed=0, vocab=200):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, s), generator=g)
    ids[:, 0] = 1
    return ids


# ---- the llm-compressor export, tensor for tensor -------------------------------------------------------
def _llmc_base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(FIXTURES / "base", dtype=torch.bfloat16,
                                                attn_implementation="eager").eval()


@pytest.mark.parametrize("name", LLMC_SCHEMES)
def test_layer_tensors_equal_llm_compressor_export(name):
    """Every tensor of the decoder layer (names, dtypes, shapes, bytes) and the config equal llm-compressor
    0.14's export of the same weights. llm-compressor calibrated this model with non-causal attention
    (its sequential pipeline lost the causal mask here: o_proj's inputs match only that way), so the
    statistics are collected the same way for the comparison."""
    ids = torch.tensor(json.loads((FIXTURES / "calib.json").read_text()))
    m = _llmc_base()
    ad, layer, sch = get_adapter(m.config), m.model.layers[0], get_scheme(name)
    asg = layer_assignment(resolve_plan(m, default=sch.weight_bits), 0, ad, sch)
    with collect_layer(layer, ad, all_experts=True) as st, torch.no_grad():
        m(ids, attention_mask=torch.zeros(4, 1, 16, 16, dtype=torch.bfloat16))
    swap_layer(layer, ad, asg, static_input_scales(st, sch, dtype=torch.bfloat16), st.shared)
    ours = layer_tensors(layer, 0, ad)
    ref = {k: v for k, v in load_file(FIXTURES / name / "model.safetensors").items() if k.startswith("model.layers.0.")}
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(ours[k].float(), v.float()), k
    got = scheme_config(m, {0: asg}, ad).model_dump()
    want = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
    assert got["format"] == want["format"] and set(got["ignore"]) == set(want["ignore"])
    keys = ("num_bits", "type", "strategy", "group_size", "block_structure", "dynamic", "symmetric")
    for g, w in zip(got["config_groups"].values(), want["config_groups"].values()):
        assert g["targets"] == w["targets"] and g["format"] == w["format"]
        for part in ("weights", "input_activations"):
            assert (g[part] is None) == (w[part] is None)
            if g[part] is not None:
                assert {k: g[part].get(k) for k in keys} == {k: w[part].get(k) for k in keys}
                assert str(g[part].get("scale_dtype")) == str(w[part].get("scale_dtype"))
    if name != "FP8_BLOCK":  # 128-groups do not fit its 32-wide inputs (check_shapes says so): no forward
        m2 = _llmc_base()
        read_layer(m2.model.layers[0], 0, ad, asg, ours, st.shared)
        with torch.no_grad():
            assert torch.equal(m(ids).logits, m2(ids).logits)  # read back: the same model, nothing re-quantized


# ---- the modules ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("name", ["NVFP4A16", "MXFP4A16"])
def test_weight_only_experts_equal_the_fused_module(arch, name):
    """Without activation quantization the fake-quant experts compute what the original fused module
    computes with the dequantized weights (every layout: transposed, biased, interleaved)."""
    m = make_tiny(arch, hidden_size=64, intermediate_size=64, moe_intermediate_size=32)
    ad = get_adapter(m.config)
    i = ad.moe_layer_indices(m)[0]
    block = ad.block_of(ad.layers(m)[i])
    ex = ad.experts_of(block)
    ref = copy.deepcopy(ex)
    fq = FakeQuantExperts(ex, get_scheme(name))
    with torch.no_grad():
        for e in range(fq.num_experts):  # write the dequantized weights into the reference module
            from secompress.experts import write_expert

            w = {p: fq.expert_weight(e, p, torch.float32) for p in ("gate_proj", "up_proj", "down_proj")}
            if fq.has_bias:
                from secompress.experts import expert_weights
                w.update({k: v for k, v in expert_weights(ref, e).items() if k.endswith("bias")})
            write_expert(ref, e, w)
        h = torch.randn(10, 64)
        idx = torch.stack([torch.randperm(8)[:2] for _ in range(10)])
        wts = torch.rand(10, 2)
        assert torch.allclose(fq(h, idx, wts), ref(h, idx, wts), atol=1e-5, rtol=1e-4)


def test_fp8_static_experts_are_served_with_the_layer_max():
    m = make_tiny("qwen3_moe")
    ad = get_adapter(m.config)
    ex = ad.experts_of(ad.block_of(ad.layers(m)[0]))
    scales = {f"experts.{e}.{k}": torch.tensor([0.01 * (e + 1)]) for e in range(8) for k in ("w13", "w2")}
    fq = FakeQuantExperts(ex, get_scheme("FP8"), scales)
    assert fq.served_input_scale("w13", 2)[0].item() == pytest.approx(0.08)  # vLLM: max over the experts
    assert fq.tensors(2, "gate_proj")["input_scale"].item() == pytest.approx(0.03)  # stored per expert
    nv = {f"experts.{e}.{k}": torch.tensor([100.0 * (e + 1)]) for e in range(8) for k in ("w13", "w2")}
    lay = FakeQuantExperts(copy.deepcopy(ad.experts_of(ad.block_of(ad.layers(make_tiny("qwen3_moe"))[0]))),
                           get_scheme("NVFP4"), nv, serving="layer")
    per = FakeQuantExperts(copy.deepcopy(ad.experts_of(ad.block_of(ad.layers(make_tiny("qwen3_moe"))[0]))),
                           get_scheme("NVFP4"), nv, serving="expert")
    assert lay.served_input_scale("w2", 5)[1].item() == 100.0 and per.served_input_scale("w2", 5)[1].item() == 600.0


def test_static_scale_quantizes_every_token_with_one_grid():
    lin = torch.nn.Linear(64, 32)
    sch = get_scheme("FP8")
    fq = FakeQuantLinear(lin, sch, input_scale=torch.tensor([0.5 / 448]))
    x = torch.randn(3, 64) * 0.1
    x[0, 0] = 10.0  # beyond the calibrated range: clipped to 0.5
    from secompress.quant.actquant import quantize_input

    xq = quantize_input(x, sch.inputs, fq.input_scale)
    assert xq[0, 0].item() == pytest.approx(0.5) and (xq - x)[1:].abs().max() < 0.01
    assert torch.allclose(fq(x), torch.nn.functional.linear(xq, fq.weight, lin.bias), atol=1e-6)


def test_swap_context_restores_the_layer():
    m = make_tiny("qwen3_moe")
    ad = get_adapter(m.config)
    ids = _ids()
    with torch.no_grad():
        before = m(ids).logits
    layer = ad.layers(m)[0]
    asg = layer_assignment(resolve_plan(m, default=8), 0, ad, get_scheme("FP8_DYNAMIC"))
    with layer_swapped(layer, ad, asg, {}):
        assert isinstance(layer.self_attn.q_proj, FakeQuantLinear) and isinstance(layer.mlp.experts, FakeQuantExperts)
        with torch.no_grad():
            assert not torch.equal(m(ids).logits, before)
    assert isinstance(layer.self_attn.q_proj, torch.nn.Linear)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, before)


# ---- statistics and the SE-aware rules -------------------------------------------------------------------------
def _planted(scale=300.0):
    """Tiny qwen3_moe whose expert 3 of layer 0 has a massive down-projection input (one neuron's up row
    scaled), as a Super Expert's massive neuron."""
    m = make_tiny("qwen3_moe", num_hidden_layers=3)
    with torch.no_grad():
        gu = m.model.layers[0].mlp.experts.gate_up_proj  # [E, 2I, H]
        gu[3, 32 + 5] *= scale  # up row of neuron 5
    return m


def test_an_se_sets_the_layer_w2_scale_and_massive_tokens_the_unaware_scales():
    m = _planted()
    ad = get_adapter(m.config)
    ids = _ids()
    with collect_layer(ad.layers(m)[0], ad, all_experts=True) as st, torch.no_grad():
        m(ids)
    w2 = torch.stack([s.amax for s in st.w2])
    assert w2[3] > 50 * w2[[0, 1, 2, 4, 5, 6, 7]].max()  # the SE's massive neuron
    fq = FakeQuantExperts(copy.deepcopy(ad.experts_of(ad.block_of(ad.layers(m)[0]))), get_scheme("FP8"),
                          static_input_scales(st, get_scheme("FP8")))
    assert fq.served_input_scale("w2", 0)[0] == fq.w2_input_scale[3]  # every expert gets the SE's scale
    # a massive token entering layer 1 (as an SE writes into the residual stream)
    h = ad.layers(m)[1].register_forward_pre_hook(
        lambda mod, a, kw: ((a[0].index_put((torch.tensor([0]), torch.tensor([0]), torch.tensor([7])),
                                            torch.tensor(3000.0)),) + a[1:], kw) if a else None, with_kwargs=True)
    with collect_layer(ad.layers(m)[1], ad, massive_threshold=10.0) as st1, torch.no_grad():
        m(ids)
    h.remove()
    assert st1.massive_tokens == 1 and st1.tokens == ids.numel()
    q = st1.linears["self_attn.q_proj"]
    assert q.amax > 2 * q.amax_clean  # after the norm the massive token still sets the SE-unaware scale
    sch = get_scheme("FP8")
    unaware, aware = static_input_scales(st1, sch, "max"), static_input_scales(st1, sch, "clip-massive")
    assert unaware["self_attn.q_proj"] > 2 * aware["self_attn.q_proj"] and set(unaware) == set(aware)
    assert ("self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj") in st1.shared


def test_se_layer_kept_16_bit_or_given_its_own_scheme():
    m = _planted()
    ad = get_adapter(m.config)
    plan = resolve_plan(m, ses=[(0, 3)], se_mode="layer", se_bits=None, default=8)
    asg0 = layer_assignment(plan, 0, ad, get_scheme("FP8"))
    assert asg0["experts"] is None and asg0["self_attn.q_proj"].name == "FP8"
    plan8 = resolve_plan(m, ses=[(0, 3)], se_mode="layer", se_bits=8, default=8)
    assert layer_assignment(plan8, 0, ad, get_scheme("FP8"), get_scheme("FP8_DYNAMIC"))["experts"].name == "FP8_DYNAMIC"
    rep = apply_scheme(m, "FP8", _ids(), plan=plan, se_scheme=None)
    assert not isinstance(m.model.layers[0].mlp.experts, FakeQuantExperts)  # the SE layer's experts: 16-bit
    assert isinstance(m.model.layers[1].mlp.experts, FakeQuantExperts)
    assert "experts.0.w13" in rep.scales[1] and "experts.0.w13" not in rep.scales[0]
    qc = scheme_config(m, {i: layer_assignment(plan, i, ad, get_scheme("FP8")) for i in range(3)}, ad).model_dump()
    assert any("layers\\.0" in t or "layers.0" in t for t in qc["ignore"] if t.startswith("re:"))


def test_apply_scheme_end_to_end_is_close_to_the_model():
    from secompress.perplexity import mean_loss

    m = make_tiny("qwen3_moe", num_hidden_layers=2)
    ids = _ids(4, 24)
    base = mean_loss(m, ids)
    for name, tol in (("FP8", 0.02), ("NVFP4", 0.2)):
        q = copy.deepcopy(m)
        apply_scheme(q, name, ids[:2])
        loss = mean_loss(q, ids)
        assert loss != base and abs(loss - base) < tol, (name, loss, base)


# ---- smoothing --------------------------------------------------------------------------------------------------
def test_smoothing_math():
    s = smoothquant_factor(torch.tensor([4.0, 1.0]), torch.tensor([1.0, 4.0]), 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5]))
    assert torch.equal(aggregate(torch.tensor([[1.0, 3.0], [2.0, 1.0]]), torch.tensor([0.5, 4.0])), torch.tensor([2.0, 4.0]))
    x = torch.cat([torch.rand(200) + 1, torch.tensor([40.0, 45.0, 300.0])])
    f = outlier_factor(x)  # EAQuant's rule: the widest gap separates 300 from the rest; 45 is the normal max
    assert (f[:202] == 1).all() and f[202].item() == pytest.approx((300 / 45) ** 0.7)
    assert gap_split(torch.tensor([1.0, 1.1, 1.2, 50.0, 52.0])) == pytest.approx(1.2)
    assert (outlier_factor(torch.rand(100) + 1) == 1).all()


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "gpt_oss"])
def test_smoothing_is_exact_and_keeps_routing(arch):
    m = make_tiny(arch, num_hidden_layers=2)
    ad = get_adapter(m.config)
    layer = ad.layers(m)[0]
    with torch.no_grad():
        layer.post_attention_layernorm.weight[5] *= 20  # an outlier channel in the MoE block's input
    ids = _ids(2, 16)
    with torch.no_grad():
        before = m(ids).logits
    with collect_layer(layer, ad) as st, torch.no_grad():
        m(ids)
    with torch.no_grad():
        rep = smooth_layer(layer, ad, st, lambda: m(ids), SmoothConfig(alpha=0.5, clean=False))
        after = m(ids).logits
    assert rep["routing_change"] == 0.0 and rep["output_change"] < 1e-4
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-3)
    moe_norm = next(k for k, v in rep.items() if isinstance(v, dict) and "consumers" in v
                    and any(c.endswith("experts") for c in v["consumers"]))
    assert any(c.endswith(ad.router) for c in rep[moe_norm]["consumers"])  # the router's columns take s too
    if arch == "gpt_oss":
        assert "down" not in rep  # clamped (gate, up) activation: no down-projection smoothing
    with collect_layer(layer, ad) as st2, torch.no_grad():
        m(ids)

    def spread(stats):  # outlier channel's max over the median channel max, all tokens entering the experts
        ch = torch.stack([s.channel_amax for s in stats.w13 if s.channel_amax is not None]).amax(0)
        return float(ch[5] / ch.median())
    assert spread(st) > 10 and spread(st2) < spread(st) / 3


# ---- EAQuant's router alignment -------------------------------------------------------------------------------
def test_router_alignment_keeps_routing_better_than_min_max():
    from secompress.quant.floatq import QArgs
    from secompress.quant.router_align import align_router, topk_agreement, topk_kl

    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.1
    w[2, 5] = 3.0  # one outlier weight stretches a min-max grid
    x = torch.randn(256, 64)
    int4 = QArgs(4, "int", "tensor")
    aligned = align_router(w, x, int4, top_k=2, steps=40)
    plain = align_router(w, x, int4, top_k=2, low=1.0)
    assert plain.ratio == 1.0 and plain.kl == pytest.approx(plain.kl_minmax)
    assert aligned.ratio < 1.0 and aligned.kl < plain.kl
    ref = x @ w.T
    assert topk_agreement(ref, x @ aligned.weight.T, 2) > topk_agreement(ref, x @ plain.weight.T, 2)
    assert topk_kl(ref, ref, 2) == pytest.approx(0.0, abs=1e-6)


# ---- the per-layer step on both layer sources ---------------------------------------------------------------------
def test_step_streamed_equals_resident(tiny_dir):
    """The step on a streamed source (each layer read from the shards, then dropped) writes the same
    compressed-tensors tensors as on the model in memory."""
    from secompress.checkpoints import load_model
    from secompress.pipeline.driver import run_pass
    from secompress.pipeline.sources import Resident, Streamed
    from secompress.quant.actapply import ActQuantStep
    from secompress.source import Source

    path = tiny_dir("qwen3_moe")
    calib = list(_ids(2, 16).split(1))
    out = {}
    for kind in ("streamed", "resident"):
        src = Streamed(Source.open(path, dtype=torch.float32, device="cpu")) if kind == "streamed" else \
            Resident(load_model(str(path), dtype="float32"))
        ad = src.adapter
        plan = resolve_plan(src.model, default=8)  # a meta skeleton for the streamed source
        got = {}

        class Writer:
            def on_layer(self, i, layer, inputs):
                got.update(layer_tensors(layer, i, ad))

        step = ActQuantStep(plan, ad, get_scheme("FP8"), calib, all_experts=True)
        run_pass(src, steps=[step, Writer()], progress=False)
        out[kind] = got
    assert set(out["streamed"]) == set(out["resident"]) and any(k.endswith("input_scale") for k in out["resident"])
    for k, v in out["resident"].items():
        assert torch.equal(out["streamed"][k], v), k


@pytest.mark.parametrize("arch", ["deepseek_v3", "mixtral"])
def test_fp8_with_smoothing_on_other_architectures(arch):
    """Dense first layers, shared experts, MLA's inner norms, checkpoint names that differ (Mixtral)."""
    from secompress.perplexity import mean_loss

    m = make_tiny(arch, num_hidden_layers=2)
    ids = _ids(2, 16)
    base = mean_loss(m, ids)
    rep = apply_scheme(m, "FP8", ids, smooth=SmoothConfig(), all_experts=True)
    assert abs(mean_loss(m, ids) - base) < 0.02
    assert all(r["output_change"] < 1e-4 and r["routing_change"] == 0.0 for r in rep.smoothing.values())
    ad = get_adapter(m.config)
    tensors = layer_tensors(ad.layers(m)[1], 1, ad)
    expert_key = f"model.layers.1.{ad.ckpt_block}.experts.0.{ad.ckpt_expert_names[0]}.weight"
    assert tensors[expert_key].dtype == torch.float8_e4m3fn and f"{expert_key[:-len('weight')]}input_scale" in tensors
    if arch == "deepseek_v3":
        assert "self_attn.kv_a_layernorm" in rep.smoothing[1]  # found by data flow, not by name
