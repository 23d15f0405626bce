import pytest
import torch

from secompress.bytetok import build_byte_tokenizer
from secompress.testing import TINY, make_tiny, save_tiny

torch.set_num_threads(2)
ARCHS = sorted(TINY)
SHARED_ARCHS = ["deepseek_v2", "deepseek_v3", "qwen2_moe"]


@pytest.fixture(scope="session")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Saved tiny checkpoints (safetensors + tokenizer), one per architecture, built once."""
    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            cache[model_type] = save_tiny(make_tiny(model_type), tmp_path_factory.mktemp(model_type) / "model")
        return cache[model_type]

    return get


@pytest.fixture
def planted_qwen2_moe(tmp_path, monkeypatch):
    """A saved 3-layer tiny qwen2_moe with a Super Expert planted at (1, 3), and a private profile cache."""
    from secompress.testing import plant_super_expert

    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    m = make_tiny("qwen2_moe", num_hidden_layers=3)
    plant_super_expert(m, layer=1, expert=3)
    return save_tiny(m, tmp_path / "tiny")
