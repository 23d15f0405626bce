import pytest

from conftest import ARCHS
from secompress.adapters import ADAPTERS, MoEAdapter, get_adapter, register
from secompress.errors import UnsupportedModelError
from secompress.checkpoints import check_model
from secompress.testing import make_tiny, tiny_config


def test_registry_covers_the_supported_architectures():
    assert set(ADAPTERS) == {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"}


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register(MoEAdapter(model_type="qwen3_moe", num_experts_key="num_experts"))


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as e:
        get_adapter("llama")
    assert "llama" in str(e.value) and "qwen3_moe" in str(e.value) and "gpt_oss" in str(e.value)


def test_model_without_moe_layers_is_rejected():
    model = make_tiny("qwen3_moe", mlp_only_layers=[0, 1, 2, 3])
    with pytest.raises(UnsupportedModelError, match="no MoE layer"):
        check_model(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_layers_experts_router_and_shared(arch):
    model = make_tiny(arch)
    ad = get_adapter(model.config)
    dense_first = arch.startswith("deepseek")
    assert ad.moe_layer_indices(model) == ([1, 2, 3] if dense_first else [0, 1, 2, 3])
    E, k = ad.num_experts(model.config), ad.top_k(model.config)
    assert (E, k) == (8, 2)
    block = ad.block_of(ad.layers(model)[1])
    assert ad.experts_of(block).down_proj.shape[0] == E
    assert ad.router_of(block).weight.shape == (E, model.config.hidden_size)
    assert (ad.shared_of(block) is not None) == (arch in ("qwen2_moe", "deepseek_v2", "deepseek_v3"))
    for name in ad.router_per_expert:
        assert getattr(ad.router_of(block), name).shape == (E,)


def test_config_keys_work_on_bare_configs():
    # recipes validate against configs built from model_type alone: no weights needed
    for arch in ARCHS:
        cfg = tiny_config(arch)
        assert get_adapter(cfg).num_experts(cfg) == 8
