"""The model card renders (issue 14): parsed as Markdown, its tables are tables and its code is code."""
from markdown_it import MarkdownIt

from secompress.recipe.evaluation import Comparison
from secompress.recipe.publish import model_card
from secompress.recipe.schema import parse_recipe

RECIPE = """\
version: 1
name: card-test
model: {id: Qwen/Qwen3-30B-A3B, model_type: qwen3_moe}
stages:
  - profile: {}
  - prune: {ratio: 0.25}
  - quantize: {method: rtn, bits: 4}
  - evaluate: {perplexity: true}
  - export: {}
"""


def _blocks(card: str):
    body = card.split("---\n", 2)[2]  # after the YAML front matter
    tokens = MarkdownIt("commonmark").enable("table").parse(body)
    tables, rows, fences = [], None, []
    for t in tokens:
        if t.type == "table_open":
            rows = []
        elif t.type == "tr_open":
            rows.append(0)
        elif t.type in ("th_open", "td_open"):
            rows[-1] += 1
        elif t.type == "table_close":
            tables.append(rows)
        elif t.type == "fence":
            fences.append((t.info, t.content))
    return tables, fences


def test_card_tables_and_code_blocks_render():
    recipe = parse_recipe(RECIPE, "r.yaml")
    comparison = Comparison.build({"perplexity": 10.0, "task/acc": 0.5}, {"perplexity": 10.5, "task/acc": 0.49},
                                  {"perplexity": 14.0, "task/acc": 0.4})
    prune = {"method": "reap", "num_experts_after": 6, "removed_per_layer": 2, "kept": {1: [0, 1, 3, 4, 6, 7]}}
    card = model_card(recipe, RECIPE, [(1, 3), (1, "shared")], comparison, "module  bits\nexperts  4",
                      prune, "import secompress\nmodel = secompress.load('PATH')")
    tables, fences = _blocks(card)
    se, metrics = tables
    assert se == [3, 3, 3] and metrics == [6, 6, 6]  # header + one row per SE / metric, every cell there
    assert "| 1 | 3 | 2 |" in card  # base-model number 3 is number 2 after pruning
    assert [info for info, _ in fences] == ["", "python", "yaml"]
    assert fences[1][1].strip().endswith("secompress.load('PATH')") and "name: card-test" in fences[2][1]
    assert "\n\n|" not in card.split("## Evaluation")[1].split("## How")[0].split("|", 1)[1]  # no blank line inside
    meta = card.split("---\n")[1]
    assert "base_model: Qwen/Qwen3-30B-A3B" in meta and "pipeline_tag: text-generation" in meta
    assert "example.invalid" not in card and "https://huggingface.co/Qwen/Qwen3-30B-A3B" in card


def test_card_carries_license_of_a_local_base_and_omits_its_path(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# base\n")
    recipe = parse_recipe(RECIPE.replace("Qwen/Qwen3-30B-A3B", str(base)), "r.yaml")
    card = model_card(recipe, RECIPE, [], None, None, None, "x")
    meta = card.split("---\n")[1]
    assert "license: apache-2.0" in meta and "base_model" not in meta
    assert f"the local checkpoint `{base}`" in card and "None found." in card
