"""The bitsandbytes backend: fused experts become real 4/8-bit bnb modules, SEs stay 16-bit."""
import copy

import pytest
import torch
from torch import nn

from secompress.adapters import get_adapter
from secompress.errors import SecompressError
from secompress.layout import PerExpertExperts
from secompress.quant.api import QuantConfig, quantize_, save_quantized
from secompress.testing import make_tiny, plant_super_expert
from test_quant import fake_profile

bnb = pytest.importorskip("bitsandbytes", reason="needs the bnb extra")
SE = (1, 3)


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
                for p in ("gate_proj", "up_proj", "down_proj"):
                    assert torch.equal(getattr(m, p).weight, getattr(orig, p).weight)
            else:
                for p in ("gate_proj", "up_proj", "down_proj"):
                    q = getattr(m, p)
                    assert type(q).__name__ == cls and q.weight.dtype == storage
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == cls  # attention too (default rule)
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


def test_bnb_models_are_not_exported_as_rtn(tmp_path):
    model = make_tiny("qwen3_moe")
    plan = quantize_(model, QuantConfig(method="bnb", bits=8, group_size=None), profile=fake_profile(model))
    with pytest.raises(SecompressError, match="in-memory only"):
        save_quantized(model, None, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
