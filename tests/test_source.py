"""The run's source, resolved once: a hub id works everywhere (offline, from the local Hugging Face cache),
in memory and streamed; the device and dtype are resolved once into torch objects."""
import json
import shutil

import pytest
import torch

from secompress.cli import main
from secompress.errors import SecompressError
from secompress.source import Source
from secompress.testing import make_tiny, plant_super_expert, save_tiny

REPO = "tiny-org/tiny-moe"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A local Hugging Face cache holding REPO at COMMIT (the layout huggingface_hub writes), offline."""
    m = make_tiny("qwen2_moe", num_hidden_layers=3)
    plant_super_expert(m, 1, 3)
    local = save_tiny(m, tmp_path / "made")
    root = tmp_path / "hub"
    repo = root / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(local, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


def test_a_hub_id_resolves_once_from_the_cache(hub_cache):
    src = Source.open(REPO, dtype="float32", device="cpu")
    assert src.path == hub_cache and src.id == REPO
    assert src.device == torch.device("cpu") and src.dtype == torch.float32
    assert src.config.model_type == "qwen2_moe" and src.adapter.model_type == "qwen2_moe"
    assert src.skeleton().model.embed_tokens.weight.device.type == "meta"
    with pytest.raises(SecompressError, match="local cache"):
        Source.open("tiny-org/not-there")
    with pytest.raises(SecompressError, match="does not exist"):
        Source.open("./no/such/folder")


def test_a_streamed_recipe_runs_on_a_hub_id_offline(hub_cache, tmp_path):
    from secompress.recipe.run import run_recipe
    from secompress.recipe.schema import parse_recipe

    text = f"""\
version: 1
name: hub
model: {{id: {REPO}, model_type: qwen2_moe, streaming: true, device: cpu}}
data: {{num_samples: 4, seq_len: 32, batch_size: 2, eval_samples: 2}}
stages:
  - profile: {{}}
  - prune: {{ratio: 0.25, method: reap}}
  - quantize: {{method: rtn, bits: 4, group_size: 16, symmetric: true}}
  - evaluate: {{perplexity: true}}
  - export: {{}}
"""
    res = run_recipe(parse_recipe(text, "r.yaml"), text, tmp_path / "out", progress=False)
    assert res.manifest["mode"] == "streamed" and res.manifest["super_experts"] == [[1, 3]]
    report = json.loads((tmp_path / "out" / "model" / "prune_report.json").read_text())
    assert report["model"] == REPO and report["num_experts_after"] == 6
    assert "| 1 | 3 |" in (tmp_path / "out" / "model" / "README.md").read_text()  # the renumbering column


def test_cli_prune_streaming_on_a_hub_id(hub_cache, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", REPO, "--ratio", "0.25", "--samples", "4", "--seq-len", "32", "--eval-samples", "2",
                 "--streaming", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads((out / "prune_report.json").read_text())["model"] == REPO
    assert "streamed layer by layer on cpu" in capsys.readouterr().out
