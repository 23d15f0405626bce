from pathlib import Path

import pytest
from transformers import AutoConfig

from secompress.adapters import get_adapter
from secompress.prune.select import make_plan
from secompress.recipe.schema import RecipeError, load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
GOOD = """\
version: 1
name: t
model: {id: some/model, model_type: qwen3_moe}
stages:
  - profile: {}
  - prune: {ratio: 0.25}
  - export: {}
"""

# the published configs' expert counts and top-k, for checking the recipes' prune ratios offline
PUBLISHED = {"Qwen/Qwen3-30B-A3B": (128, 8), "deepseek-ai/DeepSeek-V2-Lite": (64, 6),
             "mistralai/Mixtral-8x7B-v0.1": (8, 2), "allenai/OLMoE-1B-7B-0924": (64, 8),
             "Qwen/Qwen1.5-MoE-A2.7B": (60, 4), "openai/gpt-oss-20b": (32, 4), "evals/reference/model": (16, 2)}


def test_the_expected_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b-v0.1", "olmoe-1b-7b",
                                         "qwen1.5-moe-a2.7b", "gpt-oss-20b", "reference"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates_and_has_an_adapter(path):
    r = load_recipe(path)
    config = AutoConfig.for_model(r.model.model_type)  # built from model_type alone: no network
    adapter = get_adapter(config)
    assert adapter.model_type == r.model.model_type
    if r.stage("prune") is not None:
        E, k = PUBLISHED[r.model.id]
        groups = tuple(getattr(config, g) for g in adapter.group_keys) if adapter.group_keys else None
        plan = make_plan(r.stage("prune").ratio, E, k, groups)  # raises when the ratio is impossible
        assert plan.num_keep >= k


def test_good_recipe_parses_with_defaults():
    r = parse_recipe(GOOD, "g.yaml")
    assert r.stage_names == ["profile", "prune", "export"] and r.stage("prune").method == "reap"
    assert r.data.calibration == "builtin" and r.stage("profile").rule.percentile == 99.5


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("name: t", "name: t\ncolour: red"), r"g.yaml:3: unknown top-level key 'colour'"),
    (GOOD.replace("{ratio: 0.25}", "{ratio: 0.25, ratoi: 1}"), r"g.yaml:6: unknown key 'ratoi' in 'stages.prune'"),
    (GOOD.replace("{ratio: 0.25}", "{ratio: many}"), r"g.yaml:6: stages.prune.ratio: must be float"),
    (GOOD.replace("{ratio: 0.25}", "{ratio: 1.5}"), r"ratio must be in \(0, 1\)"),
    (GOOD.replace("  - profile: {}\n", "") + "  - profile: {}\n", r"g.yaml:7: stage 'profile' must come before"),
    (GOOD + "  - export: {}\n", r"g.yaml:8: stage 'export' appears twice"),
    (GOOD.replace("  - export: {}\n", "  - push: {repo_id: a/b}\n"), r"'push' needs an 'export' stage"),
    (GOOD.replace("version: 1", "version: 7"), r"g.yaml:1: recipe version 7 is not supported"),
    (GOOD.replace("model: {id: some/model, model_type: qwen3_moe}", "model: {model_type: qwen3_moe}"),
     r"g.yaml:3: model: needs id"),
    (GOOD.replace("  - export: {}\n", "  - shrink: {}\n"), r"unknown stage 'shrink'"),
    ("- just a list", r"a recipe is a YAML mapping"),
    (GOOD.replace("  - export: {}\n", "  - quantize: {method: awq}\n"), r"g.yaml:7: stages.quantize.method: unknown method 'awq'"),
    (GOOD.replace("  - export: {}\n", "  - quantize: {fallback: zero}\n"), r"g.yaml:7: stages.quantize.fallback: fallback must be one of"),
])
def test_bad_recipes_point_at_the_problem(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, "g.yaml")


def test_overrides_replace_values_and_are_validated():
    r = parse_recipe(GOOD, "g.yaml", ["stages.prune.ratio=0.5", "model.dtype=bfloat16"])
    assert r.stage("prune").ratio == 0.5 and r.model.dtype == "bfloat16"
    with pytest.raises(RecipeError, match="no stage 'quantize'"):
        parse_recipe(GOOD, "g.yaml", ["stages.quantize.bits=3"])
    with pytest.raises(RecipeError, match="must be float"):
        parse_recipe(GOOD, "g.yaml", ["stages.prune.ratio=lots"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")


@pytest.mark.parametrize("name", ["../../somewhere", "a/b", "..", ".hidden", "/abs", "x..y", ""])
def test_recipe_name_cannot_escape_the_output_root(name):
    with pytest.raises(RecipeError, match=r"g.yaml:2: .name. must be one plain folder name"):
        parse_recipe(GOOD.replace("name: t", f"name: {name!r}"), "g.yaml")


def test_run_refuses_outputs_that_replace_inputs_or_leave_the_root(tmp_path, monkeypatch):
    from secompress.errors import OutputExistsError
    from secompress.outputs import check_output_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "out").mkdir()
    for out, kw in ((".", {}), (tmp_path.parent, {}), ("model", {"inputs": ["model/x.safetensors"]}),
                    ("out/../elsewhere", {"root": "out"}), ("/", {})):
        with pytest.raises(OutputExistsError):
            check_output_dir(out, True, **kw)
    assert not (tmp_path / "elsewhere").exists()
    (tmp_path / "link").symlink_to(tmp_path / "model")
    with pytest.raises(OutputExistsError, match="symbolic link"):
        check_output_dir("link", True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_output_dir("file", True)
    assert check_output_dir("out/ok", False, root="out") == Path("out/ok")
