"""What a new user chains: prune -> quantize (the renumbered profile travels with the pruned checkpoint),
evaluate, push; every export states its size; misspelled task names, non-UTF-8 files and weak SE
evidence are named before (or instead of) anything going wrong."""
import json
from pathlib import Path

import pytest

from secompress.cli import main
from secompress.testing import make_tiny, plant_super_expert, save_tiny

REFERENCE = Path(__file__).resolve().parents[1] / "evals" / "reference" / "model"

COMMON = ["--samples", "4", "--seq-len", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    m = make_tiny("qwen3_moe")
    plant_super_expert(m, layer=1, expert=3, scale=300.0)
    return save_tiny(m, tmp_path_factory.mktemp("planted") / "model")


def test_prune_then_quantize_then_evaluate_then_push(planted, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    assert main(["profile", str(planted), *COMMON, "--out", str(tmp_path / "prof"), "--no-plots"]) == 0
    pruned = tmp_path / "pruned"
    assert main(["prune", str(planted), "--ratio", "0.25", *COMMON, "--eval-samples", "2", "--out", str(pruned)]) == 0
    out = capsys.readouterr().out
    assert "x the checkpoint's" in out and "MiB" in out  # the export states its size and ratio
    ses = json.loads((pruned / "profile" / "super_experts.json").read_text())
    kept = next(l["kept"] for l in json.loads((pruned / "prune_report.json").read_text())["layers"] if l["layer"] == 1)
    assert [(s["layer"], s["expert"]) for s in ses["super_experts"]] == [(1, kept.index(3))]  # renumbered
    # the unpruned model's profile is refused with the way out named
    assert main(["quantize", str(pruned), "--profile", str(tmp_path / "prof"), *COMMON, "--group-size", "16",
                 "--out", str(tmp_path / "q_bad")]) == 2
    assert "made before pruning" in capsys.readouterr().err
    q = tmp_path / "q"
    assert main(["quantize", str(pruned), *COMMON, "--group-size", "16", "--out", str(q)]) == 0
    out = capsys.readouterr().out
    assert "using the Super-Expert profile stored with the checkpoint" in out
    plan = json.loads((q / "quantization_plan.json").read_text())
    assert plan["super_experts"] == [{"layer": 1, "expert": kept.index(3)}] and plan["meta"]["symmetric"] is True
    assert plan["compatibility"]["vllm"]["ok"]  # symmetric by default: what the servers load
    assert main(["evaluate", str(q), "--baseline", str(planted), *COMMON, "--out", str(tmp_path / "ev")]) == 0
    rows = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["rows"]
    assert rows["model"]["perplexity"] > 0 and rows["baseline"]["sink/peak_massive_ratio"] > 1
    assert "| perplexity |" in capsys.readouterr().out
    card = (q / "README.md").read_text()  # quantize wrote its model card: push uploads the folder as it is
    assert card.startswith("---\n") and "## Precision plan" in card and "secompress quantize " in card
    assert "x the base checkpoint's" in card and "Evidence for the Super-Expert verdict" in card
    assert "## Pruning" in (pruned / "README.md").read_text()  # and so did prune
    assert main(["push", str(q), "--repo-id", "me/q", "--dry-run"]) == 0
    assert "would upload" in capsys.readouterr().out
    assert main(["push", str(tmp_path / "prof"), "--repo-id", "me/q", "--dry-run"]) == 2
    assert "not an export folder" in capsys.readouterr().err


def test_a_misspelled_task_is_named_before_any_weight_is_read(planted, tmp_path, capsys, monkeypatch):
    from secompress.source import Source

    monkeypatch.setattr(Source, "load", lambda *a, **k: pytest.fail("loaded the model"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nname: t\nmodel: {{id: {planted}}}\ndata: {{num_samples: 2, seq_len: 16}}\n"
                      "stages:\n  - evaluate: {tasks: [secompress_stdlib_nextlin], task_paths: [evals/tasks]}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "r.yaml:6: stages.evaluate.tasks: lm-eval has no task 'secompress_stdlib_nextlin'" in err
    assert "did you mean secompress_stdlib_nextline" in err and not (tmp_path / "o").exists()


def test_non_utf8_files_are_named(planted, tmp_path, capsys):
    bad = tmp_path / "calib.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert main(["profile", str(planted), "--data", str(bad), *COMMON, "--out", str(tmp_path / "p")]) == 2
    assert f"{bad}:2: not UTF-8 text (byte 0xe9" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"version: 1\nname: caf\xe9\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert f"recipe '{recipe}' is not UTF-8 text" in capsys.readouterr().err


def test_the_se_verdict_says_how_strong_its_evidence_is(planted, tmp_path):
    from secompress.bytetok import build_byte_tokenizer
    from secompress.profile import ProfileConfig, profile

    tok, cfg = build_byte_tokenizer(), ProfileConfig(num_samples=4, seq_len=32)
    weak = profile(make_tiny("qwen3_moe"), tok, config=cfg, progress=False).evidence()  # random weights
    assert weak.weak and "may have no Super Expert" in weak.why
    planted_ev = profile(str(planted), config=cfg, progress=False).evidence()  # an outlier, but no sink
    assert planted_ev.layer_ratios[0] > 10 and planted_ev.weak and "massive ratio peaks at" in planted_ev.why
    strong = profile(str(REFERENCE), config=ProfileConfig(num_samples=4, seq_len=64), progress=False)
    ev = strong.evidence()  # the trained reference model: its SE writes the first token's massive activation
    assert strong.se_ids() == [(0, 3)] and not ev.weak and ev.layer_ratios[0] > 10 and ev.massive_ratio > 20, ev
    assert ev.why.startswith("strong: ")


def test_the_se_effect_sentence_says_where_protection_mattered():
    from secompress.recipe.evaluation import Comparison

    base = {"perplexity": 2.148, "sink/peak_massive_ratio": 226.5, "sink/mean_sink_mass": 0.02191}
    aware = {"perplexity": 2.157, "sink/peak_massive_ratio": 223.0, "sink/mean_sink_mass": 0.02188}
    unaware = {"perplexity": 2.156, "sink/peak_massive_ratio": 208.2, "sink/mean_sink_mass": 0.02182}
    c = Comparison.build(base, aware, unaware)
    said = c.se_effect(["quantized the Super-Expert layer [0] to 4 bits"])
    assert said.startswith("Without protection the same recipe quantized the Super-Expert layer [0] to 4 bits")
    assert "Protection mattered for the peak massive ratio (-1.5% vs -8.1%)" in said
    assert "the perplexity (+0.4% vs +0.4%) and attention-sink mass (-0.1% vs -0.4%) differ by less than 1 point" in said
    assert "changed nothing" in c.se_effect([])  # nothing touched: the columns differ by chance, and it says so
