"""Schemes in the product: QuantConfig(scheme=...), `secompress quantize --scheme`, recipes, the
compressed-tensors export written in memory and streamed, secompress.load, and the refusals."""
import copy
import json

import pytest
import torch

pytest.importorskip("compressed_tensors")
from safetensors.torch import load_file  # noqa: E402

from secompress.cli import main  # noqa: E402
from secompress.data import CalibrationData  # noqa: E402
from secompress.quant.actquant import FakeQuantExperts, FakeQuantLinear  # noqa: E402
from secompress.quant.api import QuantConfig, load_quantized, quantize_, save_quantized  # noqa: E402
from secompress.quant.backends.gptq import GptqBackend  # noqa: E402
from secompress.quant.backends.rtn import RtnBackend  # noqa: E402
from secompress.quant.backends.scheme import SchemeBackend, SchemeOptions  # noqa: E402
from secompress.testing import make_tiny, save_tiny  # noqa: E402

COMMON = ["--samples", "4", "--seq-len", "32", "--batch-size", "2", "--device", "cpu"]


def _ids(n=4, s=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (n, s), generator=g)
    ids[:, 0] = 1
    return ids


@pytest.fixture(scope="module")
def planted():
    """Tiny Qwen3-MoE whose layer-1 expert 3 is a Super Expert as real ones are: one intermediate neuron's up
    row scaled, so the down projection's input and output both carry a massive value."""
    m = make_tiny("qwen3_moe")
    with torch.no_grad():
        m.model.layers[1].mlp.experts.gate_up_proj[3, 32 + 5] *= 300.0  # [E, 2I, H]: up row of neuron 5
    return m.eval()


@pytest.fixture(scope="module")
def planted_dir(planted, tmp_path_factory):
    return save_tiny(planted, tmp_path_factory.mktemp("planted") / "model")


# ---- the config ----------------------------------------------------------------------------------------
def test_scheme_sets_bits_and_picks_the_backend():
    c = QuantConfig(scheme="fp8")
    assert (c.scheme, c.bits, c.group_size, c.format) == ("FP8", 8, None, "compressed-tensors")
    assert isinstance(c.backend, SchemeBackend) and c.options == SchemeOptions() and c.se_mode == "layer"
    assert QuantConfig(scheme="fp8-dynamic").scheme == "FP8_DYNAMIC"
    assert (QuantConfig(scheme="NVFP4").bits, QuantConfig(scheme="NVFP4").group_size) == (4, 16)
    w4 = QuantConfig(scheme="W4A16")  # integer weight-only: rtn's own codes (pack-quantized)
    assert isinstance(w4.backend, RtnBackend) and (w4.bits, w4.group_size) == (4, 128)
    assert isinstance(QuantConfig(scheme="W4A16", method="gptq").backend, GptqBackend)
    same = QuantConfig(scheme="FP8", bits=8, group_size=None)  # the scheme's own values are fine
    assert same == c and QuantConfig(scheme="FP8", options=SchemeOptions(smooth=True)).options.smooth


@pytest.mark.parametrize("kw,match", [
    ({"scheme": "FP9"}, "unknown scheme 'FP9'; supported compressed-tensors presets: W4A16, "),
    ({"scheme": "W4A8"}, "compressed-tensors preset secompress does not implement"),
    ({"scheme": "FP8", "method": "bnb"}, "cannot be made with method bnb"),
    ({"scheme": "NVFP4", "method": "gptq"}, "gptqmodel makes integer weight-only codes"),
    ({"scheme": "FP8", "bits": 4, "group_size": 32}, "scheme FP8 sets bits 8 and group_size None"),
    ({"scheme": "FP8", "avg_bits": 6.0}, "avg_bits allocates several bit-widths"),
    ({"scheme": "FP8", "format": "dequantized"}, "scheme FP8 is written in compressed-tensors"),
    ({"scheme": "FP8", "se_mode": "expert"}, "needs se_mode: layer"),
    ({"scheme": "FP8", "symmetric": False}, "is symmetric"),
])
def test_bad_configs_are_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        QuantConfig(**kw)
    assert "\n" not in str(e.value)


def test_scheme_options_are_validated():
    with pytest.raises(ValueError, match="rule must be one of max, clip-massive"):
        SchemeOptions(rule="mean")
    with pytest.raises(ValueError, match="serving must be one of layer, expert"):
        SchemeOptions(serving="token")
    with pytest.raises(ValueError, match="takes options SchemeOptions"):
        QuantConfig(scheme="FP8", options=SchemeOptions.__mro__[1]())


# ---- in memory: quantize_, save_quantized, load ------------------------------------------------------------
@pytest.mark.parametrize("scheme,se_bits", [("FP8", 16), ("NVFP4", 8)])
def test_se_layer_protected_exported_and_read_back(planted, tmp_path, scheme, se_bits):
    """The planted Super Expert's layer keeps 16-bit experts (in `ignore`) or gets FP8_DYNAMIC (its own
    group); every other layer is quantized; the export reads back to the same logits, bit for bit."""
    m = copy.deepcopy(planted)
    ids = _ids()
    plan = quantize_(m, QuantConfig(scheme=scheme, se_bits=se_bits), data=CalibrationData(ids, "t", "x"))
    assert plan.super_experts == [(1, 3)] and plan.meta["scheme"] == scheme
    experts = [layer.mlp.experts for layer in m.model.layers]
    kinds = [type(e).__name__ for e in experts]
    assert kinds.pop(1) == ("Qwen3MoeExperts" if se_bits == 16 else "FakeQuantExperts")
    assert set(kinds) == {"FakeQuantExperts"}
    if se_bits == 8:
        assert experts[1].scheme.name == "FP8_DYNAMIC" and experts[0].scheme.name == scheme
    assert isinstance(m.model.layers[1].self_attn.q_proj, FakeQuantLinear)
    out = save_quantized(m, None, plan, tmp_path / "out")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    groups = {g["targets"][0]: g for g in qc["config_groups"].values()}
    assert groups["Linear"]["weights"]["num_bits"] == (8 if scheme == "FP8" else 4)
    regex = r"re:(model\.layers\.1\.mlp\.experts)\.\d+\.(gate_proj|up_proj|down_proj)$"
    if se_bits == 16:
        assert regex in qc["ignore"] and len(groups) == 1
    else:
        assert groups[regex]["input_activations"]["dynamic"] is True and regex not in qc["ignore"]
    assert "lm_head" in qc["ignore"] and "model.layers.0.mlp.gate" in qc["ignore"]
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == (
        torch.float32 if se_bits == 16 else torch.float8_e4m3fn)
    if scheme == "FP8":
        assert tensors["model.layers.0.mlp.experts.0.down_proj.input_scale"].shape == (1,)
    else:
        assert tensors["model.layers.0.mlp.experts.0.down_proj.weight_packed"].dtype == torch.uint8
        assert tensors["model.layers.0.mlp.experts.0.down_proj.input_global_scale"].dtype == torch.float32
    plan_json = json.loads((out / "quantization_plan.json").read_text())
    assert plan_json["export"]["compatibility"]["vllm"]["ok"]
    assert plan_json["export"]["compatibility"]["transformers"]["ok"] is (scheme == "FP8")  # measured below
    with torch.no_grad():
        want = m(ids).logits
        m2, p2 = load_quantized(out)
        assert torch.equal(m2(ids).logits, want)
    assert isinstance(m2.model.layers[0].mlp.experts, FakeQuantExperts) and p2.meta["scheme"] == scheme


@pytest.mark.parametrize("scheme,se_bits", [("FP8", 16), ("FP8", 8), ("NVFP4", 16), ("MXFP4", 8)])
def test_transformers_loads_what_the_report_says(planted, tmp_path, scheme, se_bits):
    """The compatibility report's transformers verdict is what transformers does with the export; where it
    loads, its dense expert weights are the export's codes dequantized."""
    import transformers
    from transformers import AutoModelForCausalLM

    m = copy.deepcopy(planted)
    plan = quantize_(m, QuantConfig(scheme=scheme, se_bits=se_bits), data=CalibrationData(_ids(), "t", "x"))
    out = save_quantized(m, None, plan, tmp_path / "out")
    ok = json.loads((out / "quantization_plan.json").read_text())["export"]["compatibility"]["transformers"]["ok"]
    transformers.logging.set_verbosity_error()
    try:
        t = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    except (RuntimeError, ValueError, AttributeError):
        assert not ok, "the report says transformers loads it"
        return
    assert ok, "transformers loads it; the report says it does not"
    mine = m.model.layers[0].mlp.experts  # [E, 2I, H] in transformers: gate rows then up rows
    got = t.model.layers[0].mlp.experts.gate_up_proj[2]
    want = torch.cat([mine.expert_weight(2, "gate_proj", torch.float32), mine.expert_weight(2, "up_proj", torch.float32)])
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(t(_ids()).logits).all()


def test_se_aware_scales_are_not_set_by_the_super_expert(planted):
    """SE-unaware, the SE layer's shared FP8 w2 input scale (vLLM: the max over the layer's experts) is set
    by the Super Expert's massive activation; SE-aware, that layer is 16-bit and the rest is unchanged."""
    ids = _ids()
    unaware, aware = copy.deepcopy(planted), copy.deepcopy(planted)
    quantize_(unaware, QuantConfig(scheme="FP8", protect_super_experts=False), data=CalibrationData(ids, "t", "x"))
    quantize_(aware, QuantConfig(scheme="FP8"), data=CalibrationData(ids, "t", "x"))
    w2 = unaware.model.layers[1].mlp.experts.w2_input_scale  # [E]
    assert w2.argmax() == 3 and w2[3] > 20 * w2[torch.arange(len(w2)) != 3].max()
    assert not isinstance(aware.model.layers[1].mlp.experts, FakeQuantExperts)
    assert torch.equal(aware.model.layers[0].mlp.experts.w2_input_scale, unaware.model.layers[0].mlp.experts.w2_input_scale)


def test_size_estimate_matches_the_files(planted, tmp_path):
    """The compressed-tensors format's estimate (from the unquantized skeleton and the plan, before any
    weight is read) is the size of the files written."""
    from secompress.quant.formats import FORMATS

    for scheme in ("FP8", "MXFP4"):
        m = copy.deepcopy(planted)
        plan = quantize_(m, QuantConfig(scheme=scheme), data=CalibrationData(_ids(), "t", "x"))
        est = FORMATS["compressed-tensors"].estimate_bytes(planted, plan, torch.float32)
        out = save_quantized(m, None, plan, tmp_path / scheme)
        real = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        assert real == plan.artifacts["export"].bytes
        assert abs(est - real) / real < 0.02, (scheme, est, real)


def _tensors(out):
    """Every tensor of an export, one file or shards."""
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


# ---- the CLI: in memory and streamed, refusals ---------------------------------------------------------------
def test_cli_scheme_streamed_equals_in_memory(planted_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "mem", tmp_path / "stream"
    args = ["quantize", str(planted_dir), "--scheme", "NVFP4", *COMMON, "--calibration", "all-experts"]
    assert main([*args, "--out", str(a)]) == 0
    out = capsys.readouterr().out
    assert "vllm" in out and "MiB" in out
    assert main([*args, "--streaming", "--out", str(b)]) == 0
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb) and all(torch.equal(ta[k].float(), tb[k].float()) for k in ta)
    ca, cb = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (a, b))
    assert ca == cb
    pa, pb = (json.loads((d / "quantization_plan.json").read_text()) for d in (a, b))
    assert pa["meta"]["calibration"] == "all-experts" and pa["meta"]["fused_groups"] == pb["meta"]["fused_groups"]


@pytest.mark.parametrize("extra,match", [
    (["--scheme", "FP9"], "unknown scheme 'FP9'; supported compressed-tensors presets"),
    (["--scheme", "FP8", "--method", "bnb"], "cannot be made with method bnb"),
    (["--scheme", "FP8_BLOCK"], "cannot be served on this model: .*128x128 blocks do not tile"),
    (["--scheme", "FP8", "--option", "rule=mean"], "rule must be one of max, clip-massive"),
    (["--scheme", "FP8", "--option", "quant_type=nf4"], "with scheme FP8 takes rule=VALUE"),
])
def test_cli_refusals_before_any_weight(planted_dir, tmp_path, capsys, monkeypatch, extra, match):
    from secompress.source import Source

    monkeypatch.setattr(Source, "load", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["quantize", str(planted_dir), *COMMON, *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(match, err), err
    assert not (tmp_path / "o").exists()


def test_fp8_scheme_on_an_fp8_checkpoint_is_refused(planted_dir, tmp_path, capsys, monkeypatch):
    import shutil

    from secompress.source import Source

    fp8 = tmp_path / "fp8"
    shutil.copytree(planted_dir, fp8)
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(Source, "load", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["quantize", str(fp8), *COMMON, "--scheme", "FP8_DYNAMIC", "--out", str(tmp_path / "o")]) == 2
    assert "the checkpoint is FP8 already" in capsys.readouterr().err


# ---- a recipe: pruning and a scheme in one pass ---------------------------------------------------------------
def test_recipe_prunes_and_quantizes_with_a_scheme(planted_dir, tmp_path, monkeypatch):
    from secompress.recipe.schema import RecipeError, parse_recipe

    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    text = (f"version: 1\nname: t\nmodel: {{id: {planted_dir}}}\ndata: {{num_samples: 4, seq_len: 32, batch_size: 2}}\n"
            "stages:\n  - profile: {}\n  - prune: {ratio: 0.25, method: frequency}\n"
            "  - quantize: {scheme: FP8_DYNAMIC, se_bits: 8, options: {smooth: true}}\n  - export: {}\n")
    r = parse_recipe(text, "t.yaml")
    q = r.stage("quantize")
    assert q.scheme == "FP8_DYNAMIC" and q.options == SchemeOptions(smooth=True)
    with pytest.raises(RecipeError, match=r"t.yaml:\d+: stages.quantize.*unknown scheme 'FP6'"):
        parse_recipe(text.replace("FP8_DYNAMIC", "FP6"), "t.yaml")
    (tmp_path / "r.yaml").write_text(text)
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 0
    out = next(p.parent for p in (tmp_path / "o").rglob("quantization_plan.json"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == 6  # 8 experts, 25% pruned
    groups = cfg["quantization_config"]["config_groups"]
    assert {g["weights"]["strategy"] for g in groups.values()} == {"channel"}
    import secompress

    m = secompress.load(out)
    assert isinstance(m.model.layers[0].mlp.experts, FakeQuantExperts)
    with torch.no_grad():
        assert torch.isfinite(m(_ids()).logits).all()
