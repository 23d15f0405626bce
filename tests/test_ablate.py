import pytest
import torch

from conftest import ARCHS
from secompress.ablate import mask_experts, zero_experts
from secompress.adapters import get_adapter
from secompress.instrument import Recorder, instrument
from secompress.testing import make_tiny


def _routed_counts(model, ids):
    rec = Recorder(seq_len=ids.shape[1])
    with torch.no_grad(), instrument(model, get_adapter(model.config), rec, attention=False):
        model(input_ids=ids)
    return {l: st.tokens for l, st in rec.experts.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_mask_routes_no_token_to_masked_experts_and_is_undone(arch):
    model = make_tiny(arch)
    layer = get_adapter(model.config).moe_layer_indices(model)[0]
    ids = torch.randint(0, 256, (4, 64))
    before = _routed_counts(model, ids)
    assert before[layer][2] > 0 and before[layer][5] > 0
    with mask_experts(model, [(layer, 2), (layer, 5)]):
        during = _routed_counts(model, ids)
    assert during[layer][2] == 0 and during[layer][5] == 0
    assert during[layer][:8].sum() == before[layer][:8].sum()  # tokens went elsewhere
    assert torch.equal(_routed_counts(model, ids)[layer], before[layer])


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_zero_keeps_routing_zeroes_output_and_restores_weights(arch):
    model = make_tiny(arch)
    ad = get_adapter(model.config)
    layer = ad.moe_layer_indices(model)[1]
    ids = torch.randint(0, 256, (2, 48))
    before_w = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(input_ids=ids).logits
    with zero_experts(model, [(layer, 3)] + ([(layer, "shared")] if ad.shared_expert else [])):
        rec = Recorder(seq_len=48)
        with torch.no_grad(), instrument(model, ad, rec, attention=False):
            out = model(input_ids=ids).logits
        assert rec.experts[layer].tokens[3] > 0  # still routed
        assert rec.experts[layer].out_max[3] == 0  # but emits nothing
    assert not torch.allclose(out, base)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_w[k]), k


def test_masking_too_many_is_rejected():
    model = make_tiny("qwen3_moe")
    with pytest.raises(ValueError, match="fewer than top-k"):
        with mask_experts(model, [(0, e) for e in range(7)]):
            pass
