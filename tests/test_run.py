"""`secompress run`: the recipe pipeline end to end on a tiny model (no network)."""
import json

import pytest
import torch

from secompress.cli import main
from secompress.recipe.evaluation import Comparison, RecoveryError
from secompress.recipe.run import model_fingerprint, run_recipe
from secompress.recipe.schema import parse_recipe
from secompress.testing import make_tiny, plant_super_expert, save_tiny

RECIPE = """\
version: 1
name: tiny
model: {{id: {model}, model_type: qwen3_moe}}
data: {{num_samples: 4, seq_len: 64, batch_size: 4, eval_samples: 4}}
stages:
  - profile: {{}}
  - prune: {{ratio: 0.25, method: frequency}}
  - quantize: {{method: rtn, bits: 4, group_size: 32, symmetric: true}}
  - evaluate: {{perplexity: true{extra}}}
  - export: {{}}
  - push: {{repo_id: someone/tiny-secompress, private: true}}
"""


@pytest.fixture()
def tiny_se(tmp_path, monkeypatch):
    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    m = make_tiny("qwen3_moe")
    plant_super_expert(m, layer=1, expert=3)
    return save_tiny(m, tmp_path / "tiny")


def _recipe(model, extra=""):
    text = RECIPE.format(model=model, extra=extra)
    return parse_recipe(text, "t.yaml"), text


def test_pipeline_writes_model_card_comparison_manifest_and_dry_run(tmp_path, tiny_se):
    from huggingface_hub import ModelCard

    import secompress

    recipe, text = _recipe(tiny_se)
    res = run_recipe(recipe, text, tmp_path / "out", dry_run=True, progress=False)
    out = res.out
    assert res.manifest["super_experts"] == [[1, 3]] and not res.manifest["profile_cache_hit"]
    assert set(res.pushed) >= {"README.md", "config.json", "tokenizer.json", "quantization_plan.json"}
    assert any(f.startswith("model") and f.endswith(".safetensors") for f in res.pushed)  # compressed-tensors
    assert res.manifest["push"]["dry_run"] is True
    for f in ("comparison.json", "comparison.md", "comparison.png", "manifest.json", "recipe.yaml",
              "profile/super_experts.json", "sink.json", "sink.md", "sink.png"):
        assert (out / f).is_file(), f
    rows = json.loads((out / "comparison.json").read_text())
    assert rows["perplexity"]["baseline"] > 0 and rows["perplexity"]["se_unaware"] is not None
    card = ModelCard.load(out / "model" / "README.md")  # huggingface_hub's own parser
    assert card.data.base_model is None  # a local folder is not a Hub id: said in the text instead
    assert f"the local checkpoint `{tiny_se}`" in card.text and "example.invalid" not in card.text
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "super-experts" in card.data.tags and card.data.eval_results
    m = secompress.load(out / "model")  # the SE's layer is in `ignore`: stock transformers cannot load it
    assert m.config.num_experts == 6  # 25% of 8 removed
    plan = json.loads((out / "model" / "quantization_plan.json").read_text())
    assert plan["se_mode"] == "layer" and plan["export"]["format"] == "compressed-tensors"
    assert not plan["compatibility"]["transformers"]["ok"] and plan["compatibility"]["vllm"]["ok"]
    assert json.loads((out / "model" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"
    assert "Precision plan" in card.text
    report = json.loads((out / "model" / "prune_report.json").read_text())
    kept1 = next(l["kept"] for l in report["layers"] if l["layer"] == 1)
    assert 3 in kept1  # the SE survived pruning ...
    assert f"| 1 | 3 | {kept1.index(3)} |" in card.text and "Precision plan" in card.text  # numbered both ways
    assert plan["super_experts"] == [{"layer": 1, "expert": kept1.index(3)}]  # ... renumbered, and kept 16-bit
    se_unit = next(u for u in plan["modules"] if u["layer"] == 1 and u["expert"] == kept1.index(3))
    assert se_unit["bits"] is None


def test_profile_cache_is_reused_and_invalidated(tmp_path, tiny_se):
    recipe, text = _recipe(tiny_se)
    run_recipe(recipe, text, tmp_path / "a", dry_run=True, progress=False)
    again = run_recipe(recipe, text, tmp_path / "b", dry_run=True, progress=False)
    assert again.manifest["profile_cache_hit"]
    changed = parse_recipe(text.replace("num_samples: 4", "num_samples: 3"), "t.yaml")
    assert not run_recipe(changed, text, tmp_path / "c", dry_run=True, progress=False).manifest["profile_cache_hit"]
    before = model_fingerprint(str(tiny_se), None)
    (tiny_se / "model.safetensors").touch()
    assert model_fingerprint(str(tiny_se), None) != before  # new weights file -> new key


def test_recovery_threshold_fails_the_run_and_writes_nothing(tmp_path, tiny_se, monkeypatch):
    import secompress.recipe.run as run_mod

    import math

    recipe, text = _recipe(tiny_se, extra=", recovery_threshold: 0.9")
    losses = iter([(math.log(10.0), math.log(12.5)), (None, math.log(30.0))])  # baseline, SE-aware; SE-unaware
    real = run_mod.run_job

    def job(*a, **k):
        res = real(*a, **k)
        res.loss_before, res.loss_after = next(losses)
        return res

    monkeypatch.setattr(run_mod, "run_job", job)
    with pytest.raises(RecoveryError, match="perplexity recovers 0.800"):
        run_recipe(recipe, text, tmp_path / "out", dry_run=True, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_interruption_leaves_nothing_and_existing_output_is_kept(tmp_path, tiny_se, monkeypatch):
    import secompress.recipe.run as run_mod

    recipe, text = _recipe(tiny_se)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "_card", boom)  # interrupted while writing the export's model card
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, text, tmp_path / "out", dry_run=True, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    (tmp_path / "out").mkdir()
    assert main(["run", "t.yaml", "--out", str(tmp_path / "out")]) == 2  # missing recipe: clear error


def test_push_without_token_fails_before_compute_and_failed_push_keeps_the_export(tmp_path, tiny_se, monkeypatch):
    import huggingface_hub

    from secompress.errors import SecompressError
    from secompress.recipe.publish import PushError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    recipe, text = _recipe(tiny_se)
    with pytest.raises(SecompressError, match="needs a Hugging Face token"):
        run_recipe(recipe, text, tmp_path / "out", dry_run=False, progress=False)
    assert not (tmp_path / "out").exists()  # checked before any compute

    def offline(*a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setenv("HF_TOKEN", "hf_test_not_a_real_token")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    with pytest.raises(PushError, match="export was kept") as e:
        run_recipe(recipe, text, tmp_path / "out", dry_run=False, progress=False)
    assert str(tmp_path / "out" / "model") in str(e.value) and "hf_test" not in str(e.value)
    assert list((tmp_path / "out" / "model").glob("model*.safetensors"))


def test_cli_run_refuses_existing_output(tmp_path, tiny_se, capsys):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(_recipe(tiny_se)[1])
    (tmp_path / "out").mkdir()
    assert main(["run", str(recipe_file), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unsupported_architecture_in_recipe_is_rejected(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    Qwen3ForCausalLM(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=300)).save_pretrained(tmp_path / "dense")
    recipe, text = _recipe(tmp_path / "dense")
    from secompress.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="qwen3_moe"):
        run_recipe(recipe, text, tmp_path / "out", dry_run=True, progress=False)


def test_comparison_recovery_direction():
    c = Comparison.build({"perplexity": 10.0, "t/acc": 0.5}, {"perplexity": 12.5, "t/acc": 0.4},
                         {"perplexity": 20.0, "t/acc": 0.25})
    assert c.rows["perplexity"]["recovery_se_aware"] == pytest.approx(0.8)  # lower is better
    assert c.rows["t/acc"]["recovery_se_aware"] == pytest.approx(0.8)  # higher is better
    assert c.rows["t/acc"]["recovery_se_unaware"] == pytest.approx(0.5)
    c.check(0.75)
    with pytest.raises(RecoveryError):
        c.check(0.85)


def test_secompress_load_picks_the_right_loader(tmp_path, tiny_se):
    import torch

    import secompress
    from secompress.quant.api import QuantizedExperts

    recipe, text = _recipe(tiny_se)
    res = run_recipe(recipe, text, tmp_path / "out", dry_run=True, progress=False)
    q = secompress.load(res.out / "model")
    assert any(isinstance(m, QuantizedExperts) for m in q.modules())  # real integer-coded experts
    plain = secompress.load(tiny_se)
    assert not any(isinstance(m, QuantizedExperts) for m in plain.modules())
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(q(input_ids=ids).logits).all()


def test_pipeline_exports_bitsandbytes_after_pruning(tmp_path, tiny_se):
    pytest.importorskip("bitsandbytes", reason="needs the bnb extra")
    import torch

    import secompress

    text = RECIPE.format(model=tiny_se, extra="").replace(
        "{method: rtn, bits: 4, group_size: 32, symmetric: true}", "{method: bnb, bits: 4}")
    res = run_recipe(parse_recipe(text, "t.yaml"), text, tmp_path / "out", dry_run=True, progress=False)
    out = res.out / "model"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == cfg["num_local_experts"] == 6  # pruned 8 -> 6, both key spellings
    assert cfg["quantization_config"]["load_in_4bit"]
    assert "secompress.load('PATH')" in (out / "README.md").read_text()
    m = secompress.load(out)
    kinds = {type(x).__name__ for x in m.model.layers[0].mlp.experts.per_expert[0].children()}
    assert kinds == {"Linear4bit"}
    (se,) = json.loads((out / "quantization_plan.json").read_text())["super_experts"]  # renumbered by the prune
    assert se["layer"] == 1 and len(m.model.layers[1].mlp.experts.per_expert) == 6
    assert type(m.model.layers[1].mlp.experts.per_expert[se["expert"]].down_proj).__name__ == "Linear"  # 16-bit
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=torch.randint(0, 256, (1, 16))).logits).all()


def test_pipeline_runs_gptq_and_exports_compressed_tensors(tmp_path, tiny_se):
    text = RECIPE.format(model=tiny_se, extra="").replace(
        "{method: rtn, bits: 4, group_size: 32, symmetric: true}", "{method: gptq, bits: 4, group_size: 32, fallback: rtn}")
    res = run_recipe(parse_recipe(text, "t.yaml"), text, tmp_path / "out", dry_run=True, progress=False)
    out = res.out / "model"
    assert {"quantization_plan.json", "README.md"} <= set(p.name for p in out.iterdir())
    plan = json.loads((out / "quantization_plan.json").read_text())
    (se,) = plan["super_experts"]
    assert plan["se_mode"] == "layer" and plan["export"]["format"] == "compressed-tensors"
    from safetensors import safe_open

    tensors = {}
    for shard in out.glob("model*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    assert f"model.layers.1.mlp.experts.{se['expert']}.down_proj.weight" in tensors  # SE layer: 16-bit
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in tensors  # ... all of it
    assert tensors["model.layers.0.mlp.experts.0.down_proj.weight_packed"].dtype == torch.int32  # GPTQ codes
    import secompress

    with torch.no_grad():
        assert torch.isfinite(secompress.load(out)(input_ids=torch.randint(0, 256, (1, 16))).logits).all()
    assert json.loads((out / "config.json").read_text())["num_experts"] == 6  # pruned, legacy key
    rows = json.loads((res.out / "comparison.json").read_text())["perplexity"]
    assert rows["se_aware"] != rows["baseline"] and rows["se_unaware"] is not None  # evaluated with the codes
    assert not list(tmp_path.glob(".out.work-*"))  # the work folder is gone
    assert "gptqmodel" not in __import__("sys").modules
