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
