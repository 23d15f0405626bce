"""The compatibility report: every rule of secompress.quant.compat fires on an export that hits it (and
only then), says the release and source it was checked against, and the loud warning about
transformers releases that re-initialise ignored expert layers is in the report and logged when a
compressed-tensors export is written."""
import dataclasses
import logging

import pytest

from secompress.quant.compat import CHECKED, RULES, ExportFacts, Rule, _check_registry, fired, report, warnings

CT = "compressed-tensors"
FITS = dict(fmt=CT, expert_bits={0: 4, 1: 4}, symmetric=True, group_size=128, hidden=2048, intermediate=768)


def _facts(**kw) -> ExportFacts:
    return ExportFacts(**{**FITS, **kw})


def _names(facts: ExportFacts) -> set[str]:
    return {r.name for r, _ in fired(facts)}


def test_an_export_that_fits_every_kernel_fires_no_refusal():
    rep = report(_facts())
    assert rep["vllm"][0] and rep["sglang"][0] and rep["transformers"][0]
    assert not any(r.verdict in ("no", "slower", "warn") for r, _ in fired(_facts()))
    assert "vLLM 0.34.0" in rep["vllm"][1] and "SGLang 0.5.23" in rep["sglang"][1]
    assert warnings(rep) == []


# (facts, runtime, loads it, rule that must fire, words in the runtime's text)
CASES = [
    (_facts(expert_bits={0: 4, 1: None}), "vllm", True, "vllm.ignored_layers", "MoE layers [1] (in `ignore`)"),
    (_facts(expert_bits={0: 4, 1: None}), "sglang", True, "sglang.ignored_layers", "served unquantized"),
    (_facts(expert_bits={0: 4, 1: 8}), "vllm", True, "vllm.mixed_widths", "[4, 8] bits side by side"),
    (_facts(expert_bits={0: 4, 1: 8}), "sglang", True, "sglang.mixed_widths", "own scheme"),
    (_facts(symmetric=False), "vllm", True, "vllm.asym_int4", "asymmetric int4"),
    (_facts(symmetric=False), "sglang", True, "sglang.asym_int4", "asymmetric int4"),
    (_facts(symmetric=False, expert_bits={0: 8, 1: 8}), "vllm", False, "vllm.asym_int8", "asymmetric int8"),
    (_facts(symmetric=False, expert_bits={0: 8, 1: 8}), "sglang", False, "sglang.asym_int8", "get_scalar_type"),
    (_facts(expert_bits={0: 3, 1: 3}), "vllm", False, "vllm.moe_bits", "[3]-bit experts"),
    (_facts(expert_bits={0: 2, 1: 4}), "sglang", False, "sglang.moe_bits", "[2]-bit experts"),
    (_facts(group_size=16), "vllm", True, "vllm.marlin_group", "slower: group size 16"),
    (_facts(group_size=256), "sglang", False, "sglang.marlin_shape", "group size 256"),
    (_facts(hidden=2112), "vllm", True, "vllm.marlin_hidden", "slower: hidden size 2112"),
    (_facts(hidden=2112), "sglang", False, "sglang.marlin_shape", "hidden size 2112"),
    (_facts(intermediate=96, group_size=32), "sglang", False, "sglang.marlin_shape", "expert width 96"),
    (_facts(group_size=None, hidden=2112), "vllm", False, "vllm.channel_off_marlin", "channel-wise scales"),
    (_facts(linear_bits=(4,), group_size=16), "vllm", True, "vllm.dense_group", "quantized Linear layers"),
    (_facts(fused_experts=True, arch="gpt_oss"), "vllm", False, "vllm.fused_experts", "gpt_oss keeps experts fused"),
    (_facts(fused_experts=True, arch="gpt_oss"), "sglang", False, "sglang.fused_experts", "without an error"),
    (_facts(fused_experts=True, arch="gpt_oss"), "transformers", False, "transformers.fused_experts",
     "WARNING: transformers 5.24 loads it WITHOUT an error"),
    (_facts(problems=("layer 2: experts [3] differ",)), "vllm", False, "vllm.expert0", "layer 2: experts [3]"),
    (_facts(problems=("layer 2: experts [3] differ",)), "sglang", False, "sglang.expert0", "get_moe_scheme"),
    (_facts(expert_bits={0: 4, 1: None}), "transformers", False, "transformers.ignored_layers", "5.24 refuses"),
    (_facts(expert_bits={0: 4, 1: 8}), "transformers", False, "transformers.mixed", "get_experts_scheme"),
    (_facts(symmetric=False), "transformers", False, "transformers.asym", "zero points"),
    (ExportFacts(fmt="bnb"), "vllm", False, "vllm.bnb", "no bitsandbytes quantization method"),
    (ExportFacts(fmt="dequantized", index=False), "vllm", False, "vllm.index", "secompress_quant.safetensors"),
    (ExportFacts(fmt="dequantized", index=None), "sglang", False, "sglang.index", "not known whether"),
    (ExportFacts(fmt="dequantized", index=True), "vllm", True, "vllm.index_ok", "codes file is skipped"),
]


@pytest.mark.parametrize("facts, runtime, ok, rule, words", CASES)
def test_each_rule_fires_on_an_export_that_hits_it(facts, runtime, ok, rule, words):
    rep = report(facts)
    assert rep[runtime][0] is ok, rep[runtime]
    assert rule in _names(facts)
    assert words in rep[runtime][1], rep[runtime][1]
    r = next(r for r in RULES if r.name == rule)
    assert f"[{r.checked}: {r.source}]" in rep[runtime][1]  # the release and the file::function it was read in


def test_every_rule_is_hit_by_a_case_and_silent_on_the_export_that_fits():
    hit = {rule for *_, rule, _ in CASES} | {"transformers-5.17.reinit", "sglang.index_ok", "sglang.bnb"}
    assert hit == {r.name for r in RULES}
    quiet = _names(_facts())
    assert quiet == set(), quiet


def test_rules_name_their_release_and_source():
    for r in RULES:
        assert r.checked in CHECKED.values()
        assert "::" in r.source or ".cuh (" in r.source, r.name  # file::function (a CUDA file: its macros)
    with pytest.raises(ValueError, match="defined twice"):
        _check_registry((RULES[0], RULES[0]))
    with pytest.raises(ValueError, match="verdict"):
        dataclasses.replace(RULES[0], verdict="maybe")
    with pytest.raises(ValueError, match="runtime"):
        Rule("x", "tgi", ("bnb",), "no", "x.py::f", lambda f: None)


def test_facts_are_validated():
    with pytest.raises(ValueError, match="fmt"):
        ExportFacts(fmt="gguf")
    with pytest.raises(ValueError, match="group_size"):
        ExportFacts(fmt=CT, group_size=0)
    with pytest.raises(ValueError, match="bits"):
        ExportFacts(fmt=CT, expert_bits={0: 5})


def test_transformers_517_reinit_is_a_loud_warning_in_the_report():
    facts = _facts(expert_bits={0: None, 1: 4})
    rep = report(facts)
    (w,) = warnings(rep)
    assert w.startswith("transformers: WARNING: transformers 5.17 loads this export WITHOUT an error")
    assert "layers [0] at random" in w and "[transformers 5.17.0: " in w
    assert warnings({k: {"ok": ok, "why": why} for k, (ok, why) in rep.items()}) == [w]  # as stored in the plan
    assert warnings(report(_facts())) == []


def test_a_compressed_tensors_export_with_an_ignored_layer_logs_the_warning(tmp_path, caplog):
    pytest.importorskip("compressed_tensors")
    from test_compressed_tensors import _quantized

    from secompress.quant.formats.ct import save_ct

    _, m, plan = _quantized("qwen3_moe")  # the Super Expert's layer 1 16-bit, in `ignore`
    with caplog.at_level(logging.WARNING, logger="secompress.quant.compat"):
        out = save_ct(m, None, plan, tmp_path / "ct")
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(out) in msg and "transformers 5.17 loads this export WITHOUT an error" in msg for msg in logged)
    import json

    compat = json.loads((out / "quantization_plan.json").read_text())["compatibility"]
    assert compat["vllm"]["ok"] and "MoE layers [1] (in `ignore`) are served unquantized" in compat["vllm"]["why"]
    assert "group size 8" in compat["sglang"]["why"] and "ignore" not in compat["sglang"]["why"]  # the tiny shapes
    assert not compat["transformers"]["ok"] and "WARNING: transformers 5.17" in compat["transformers"]["why"]


def test_bnb_and_dequantized_reports_use_the_rules():
    from secompress.quant.compat import ExportFacts, report
    from secompress.quant.formats import FORMATS
    from secompress.quant.plan import QuantPlan

    plan = QuantPlan(bits={}, units={}, source={}, meta={"method": "rtn", "format": "dequantized"})
    assert "no bitsandbytes quantization method" in FORMATS["bitsandbytes"].compatibility(plan)["vllm-fused-moe"][1]
    assert not report(ExportFacts(fmt="dequantized", index=False))["vllm"][0]  # no index: vLLM reads the codes too
    deq = FORMATS["dequantized"].compatibility(plan)  # its writer always writes the index
    assert deq["vllm-fused-moe"][0] and deq["sglang"][0] and "index" in deq["vllm-fused-moe"][1]
