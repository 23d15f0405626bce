"""The bitsandbytes backend: fused experts become real 4/8-bit bnb modules, SEs stay 16-bit,
and the export reloads (fresh process) with the same logits."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from secompress.adapters import get_adapter
from secompress.errors import SecompressError
from secompress.checkpoints import load_model
from secompress.layout import PerExpertExperts
from secompress.quant.api import PLAN_NAME, QuantConfig, quantize_, save_quantized
from secompress.testing import make_tiny, plant_super_expert, save_tiny
from test_quant import fake_profile

bnb = pytest.importorskip("bitsandbytes", reason="needs the bnb extra")
SE = (1, 3)
PROJ = ("gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("arch, bits, cls, storage", [
    ("qwen3_moe", 4, "Linear4bit", torch.uint8), ("gpt_oss", 4, "Linear4bit", torch.uint8),
    ("qwen3_moe", 8, "Linear8bitLt", torch.int8)])
def test_experts_become_real_bnb_modules_and_the_se_stays_exact(arch, bits, cls, storage):
    model = make_tiny(arch)
    plant_super_expert(model, *SE)
    ad = get_adapter(model.config)
    before = copy.deepcopy(model)
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    quantize_(model, QuantConfig(method="bnb", bits=bits, group_size=None), profile=fake_profile(model))
    for l in ad.moe_layer_indices(model):
        experts = ad.experts_of(ad.block_of(ad.layers(model)[l]))
        assert isinstance(experts, PerExpertExperts)
        for e, m in enumerate(experts.per_expert):
            if (l, e) == SE:  # kept 16-bit, bit-identical to the fused original
                assert type(m.down_proj) is nn.Linear
                orig = PerExpertExperts(ad.experts_of(ad.block_of(ad.layers(before)[l]))).per_expert[e]
                for p in PROJ:
                    assert torch.equal(getattr(m, p).weight, getattr(orig, p).weight)
            else:
                for p in PROJ:
                    q = getattr(m, p)
                    assert type(q).__name__.startswith(cls) and q.weight.dtype == storage
    assert type(model.model.layers[0].self_attn.q_proj).__name__.startswith(cls)  # attention too (default rule)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.isfinite(out).all()
    rel = (out - ref).abs().mean() / ref.abs().mean()
    assert rel < (0.25 if bits == 4 else 0.05), rel


def test_bnb_rejects_other_widths_before_touching_weights():
    model = make_tiny("qwen3_moe")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="4 or 8 bits"):
        quantize_(model, QuantConfig(method="bnb", bits=3, group_size=None), profile=fake_profile(model))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---- export --------------------------------------------------------------------------------
def _bnb_model(tmp_path, arch, bits, **overrides):
    """A bf16 tiny model as from_pretrained gives it, with a planted SE, quantized by bnb."""
    model = make_tiny(arch, **overrides)
    plant_super_expert(model, *SE)
    src = save_tiny(model, tmp_path / "src")
    model = load_model(src, dtype=torch.bfloat16)
    orig = {p: getattr(PerExpertExperts(model.model.layers[SE[0]].mlp.experts).per_expert[SE[1]], p).weight.clone()
            for p in PROJ}
    plan = quantize_(model, QuantConfig(method="bnb", bits=bits, group_size=None), profile=fake_profile(model))
    return model, plan, orig


def _reload_in_fresh_process(out, ids, tmp_path) -> dict:
    script = (
        "import torch, secompress\n"
        f"m = secompress.load({str(out)!r})\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): logits = m(ids).logits\n"
        f"se = m.model.layers[{SE[0]}].mlp.experts.per_expert[{SE[1]}]\n"
        "q = m.model.layers[0].mlp.experts.per_expert[0].down_proj\n"
        f"torch.save({{'logits': logits, 'se': {{p: getattr(se, p).weight for p in {PROJ!r}}}, "
        "'se_type': type(se.down_proj).__name__, 'q_type': type(q).__name__, 'q_dtype': str(q.weight.dtype)}, "
        f"{str(tmp_path / 'r.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=600)
    return torch.load(tmp_path / "r.pt")


@pytest.mark.parametrize("arch, bits", [("qwen3_moe", 4), ("mixtral", 8), ("gpt_oss", 4)])
def test_bnb_export_reloads_in_a_fresh_process(tmp_path, arch, bits):
    model, plan, orig = _bnb_model(tmp_path, arch, bits)
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    out = save_quantized(model, None, plan, tmp_path / "out")
    r = _reload_in_fresh_process(out, ids, tmp_path)
    assert torch.isfinite(r["logits"]).all()
    assert torch.equal(r["logits"], logits)  # the stored bytes, not a re-quantization
    assert r["se_type"] == "Linear" and all(torch.equal(r["se"][p], orig[p]) for p in PROJ)  # SE bit-identical
    assert r["q_type"].startswith("Linear4bit" if bits == 4 else "Linear8bitLt")
    assert r["q_dtype"] == ("torch.uint8" if bits == 4 else "torch.int8")
    cfg = json.loads((out / "config.json").read_text())
    legacy = {"qwen3_moe": "num_experts", "mixtral": "num_local_experts", "gpt_oss": "num_local_experts"}[arch]
    assert cfg[legacy] == 8  # the transformers-4 key
    q = cfg["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q[f"load_in_{bits}bit"]
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    se_proj = "w2" if arch == "mixtral" else "down_proj"
    assert f"model.layers.{SE[0]}.{block}.experts.{SE[1]}.{se_proj}" in q["llm_int8_skip_modules"]
    assert json.loads((out / PLAN_NAME).read_text())["export"]["format"] == "secompress-bnb"


def test_bnb_export_is_much_smaller_and_saving_after_a_forward_is_safe(tmp_path):
    # in_features 128 > bnb's 64-block: the CPU repacking bnb does on a forward must not leak into the file
    model, plan, _ = _bnb_model(tmp_path, "qwen3_moe", 4, hidden_size=128, moe_intermediate_size=128)
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).logits
    out = save_quantized(model, None, plan, tmp_path / "out")
    from secompress.quant.bnb_export import load_bnb

    m2, plan2 = load_bnb(out)
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, logits)
    assert plan2.bits == plan.bits
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert size(out) < 0.45 * size(tmp_path / "src") / 2  # src is float32; 4-bit vs bf16 is < 0.45x


def test_bnb_export_refuses_a_model_that_does_not_match_the_plan(tmp_path):
    model, plan, _ = _bnb_model(tmp_path, "qwen3_moe", 4)
    plain = make_tiny("qwen3_moe")
    with pytest.raises(SecompressError, match="planned at 4 bits"):
        save_quantized(plain, None, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
