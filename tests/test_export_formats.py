"""Export formats: one per-layer writer each, the same over a model in memory and in the streamed engine.

(a) a format registered in one file is written in memory (``save_quantized``) and streamed
(a compress job over the shards) with identical files, and ``secompress.load`` finds it; (b) issue 23's export
fixes: scales in the model's 16-bit dtype (secompress.load computes what a server computes), the
dequantized format's index and codes subfolder, the tied-embedding reference model streamed,
readable files, the checkpoint's own 16-bit dtype whatever the compute dtype, and the size and
ratio of every export."""
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import secompress
from secompress.checkpoints import as_saved, load_model, write_model_config
from secompress.prune import PruneConfig, prune, save_pruned
from secompress.quant import QuantConfig, quantize_, save_quantized
from secompress.quant.api import CODES_DIR, CODES_NAME, PLAN_NAME, codes_file, dequantized
from secompress.quant.formats import FORMATS, register_format, unregister_format
from secompress.quant.formats.base import ExportFormat, LayerWriter, cast_floats, plan_export_format, write_plan
from secompress.compress import Job
from secompress.testing import make_tiny, save_tiny
from test_streamed import streamed

REFERENCE = Path(__file__).resolve().parents[1] / "evals" / "reference" / "model"


def _stored(folder: Path, pattern="*.safetensors") -> dict:
    out = {}
    for f in sorted(folder.glob(pattern)):
        with safe_open(str(f), "pt") as h:
            out.update({str(f.relative_to(folder)) + ":" + k: h.get_tensor(k) for k in h.keys()})
    return out


def _by_key(folder: Path) -> dict:
    return {k.split(":", 1)[1]: v for k, v in _stored(folder, "**/*.safetensors").items()}


# ---- (a) a dummy export format registered in one place -----------------------------------------
class Float16Writer(LayerWriter):
    """Writes the dequantized model in float16, whatever the export dtype: each layer as it comes."""

    format = "fp16-dequantized"

    def rest_tensors(self, model):
        head = self.adapter.layers_path + "."
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
        return cast_floats(as_saved(model, sd), torch.float16)

    def layer_tensors(self, index, layer):
        with dequantized(self.model, layer=index):
            sd = self.adapter.layers(self.model)[index].state_dict(prefix=self.layer_prefix(index))
            return cast_floats(as_saved(self.model, sd), torch.float16)

    def write_config(self, summary):
        write_model_config(self.skeleton, self.folder, self.adapter, dtype=torch.float16)
        write_plan(self.folder, self.plan, {"format": self.format, "size": summary.to_json()})


class Float16Format(ExportFormat):
    name = "fp16-dequantized"
    holds = "codes"  # any backend whose results hold integer codes (rtn, gptq) can be written in it
    writer_class = Float16Writer
    load_snippet = "import secompress\nmodel = secompress.load('PATH')  # fp16 dequantized"

    def estimate_bytes(self, skeleton, plan, dtype, source=None):
        return FORMATS["plain"].estimate_bytes(skeleton, None, torch.float16)

    def detect(self, path):
        return plan_export_format(path) == self.name

    def load(self, path, device=None):
        model = load_model(path, dtype="auto", device=device)
        model.loaded_by_fp16_format = True
        return model, None

    def compatibility(self, plan):
        return {"transformers": (True, "float16 dequantized weights")}


@pytest.fixture()
def fp16_format():
    register_format(Float16Format())
    with pytest.raises(ValueError, match="registered already"):
        register_format(Float16Format())  # a duplicate name is an error
    yield
    unregister_format("fp16-dequantized")


def test_a_format_registered_in_one_place_writes_in_memory_and_streamed(fp16_format, tmp_path):
    src = save_tiny(make_tiny("qwen3_moe", num_hidden_layers=2), tmp_path / "in")
    cfg = QuantConfig(bits=4, group_size=16, protect_super_experts=False, format="fp16-dequantized")
    model = load_model(src, torch.float32)
    plan = quantize_(model, cfg)
    assert "float16 dequantized weights" in plan.table()
    save_quantized(model, None, plan, tmp_path / "mem")  # the writer over the resident model
    splan, run = streamed(src, Job(quant=cfg))
    res = run(None, tmp_path / "str", progress=False)  # the same writer, layer by layer
    a, b = _by_key(tmp_path / "mem"), _by_key(tmp_path / "str")
    assert a and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert {t.dtype for t in a.values()} == {torch.float16}
    with dequantized(model):
        assert torch.equal(a["model.layers.1.mlp.experts.5.down_proj.weight"],
                           model.model.layers[1].mlp.experts.down_proj[5].half())
    assert res.export.bytes == sum(f.stat().st_size for f in (tmp_path / "str").glob("*.safetensors"))
    assert abs(splan.output_bytes - res.export.bytes) < 0.05 * res.export.bytes  # the format's estimate
    back = secompress.load(tmp_path / "str")  # found by the format's detect
    assert getattr(back, "loaded_by_fp16_format", False) and back.dtype == torch.float16


# ---- (b) issue 23 ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_src(tmp_path_factory):
    """A bf16 checkpoint (the usual published dtype)."""
    return save_tiny(make_tiny("qwen3_moe", num_hidden_layers=2).to(torch.bfloat16),
                     tmp_path_factory.mktemp("bf16") / "in")


def test_ct_scales_in_the_model_dtype_and_load_computes_what_a_server_computes(bf16_src, tmp_path):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    outs = {}
    for sd in ("model", "float32"):
        model = load_model(bf16_src, torch.float32)  # evaluated in float32, written in the checkpoint's bf16
        plan = quantize_(model, QuantConfig(bits=4, group_size=8, symmetric=True, protect_super_experts=False,
                                            scale_dtype=sd))
        outs[sd] = save_quantized(model, None, plan, tmp_path / sd)
        t = _by_key(outs[sd])
        scales = {v.dtype for k, v in t.items() if k.endswith("weight_scale")}
        assert scales == {torch.bfloat16 if sd == "model" else torch.float32}, sd
        assert {v.dtype for k, v in t.items() if k.endswith(("norm.weight", "embed_tokens.weight"))} == {torch.bfloat16}
        exp = json.loads((outs[sd] / PLAN_NAME).read_text())["export"]
        assert exp["dtype"] == "bfloat16" and exp["scale_dtype"] == ("bfloat16" if sd == "model" else "float32")
    size = {sd: json.loads((o / PLAN_NAME).read_text())["export"]["size"]["bytes"] for sd, o in outs.items()}
    assert size["model"] < size["float32"]
    # what a server computes: compressed-tensors' dequantizer in the model's dtype, with the stored scales;
    # secompress.load dequantizes with the same stored scales into the same bf16 weights
    for sd, out in outs.items():
        served = CompressedTensorsDequantizer(out, dtype=torch.bfloat16).process(load_file(out / "model.safetensors"))
        mine = secompress.load(out)
        with dequantized(mine):
            w = mine.model.layers[1].mlp.experts.down_proj  # [E, H, I]
            assert w.dtype == torch.bfloat16
            for e in range(w.shape[0]):
                assert torch.equal(served[f"model.layers.1.mlp.experts.{e}.down_proj.weight"], w[e]), (sd, e)
            q = mine.model.layers[0].self_attn.q_proj.weight
            assert torch.equal(served["model.layers.0.self_attn.q_proj.weight"], q)


def test_dequantized_export_has_an_index_and_keeps_the_codes_out_of_the_servers_way(bf16_src, tmp_path):
    from secompress.quant.modules import QuantizedLinear

    model = load_model(bf16_src, torch.float32)
    plan = quantize_(model, QuantConfig(bits=4, group_size=8, protect_super_experts=False, format="dequantized"))
    out = save_quantized(model, None, plan, tmp_path / "dq")
    top = sorted(p.name for p in out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(top)  # one file, indexed all the same
    assert not any(k.endswith((".qweight", ".scales", ".zeros")) for k in _stored(out))  # what vLLM globs
    assert codes_file(out) == out / CODES_DIR / CODES_NAME
    back = secompress.load(out)
    assert isinstance(back.model.layers[0].self_attn.q_proj, QuantizedLinear)  # the integer codes, rebuilt
    ids = torch.randint(3, 250, (1, 16))
    with torch.no_grad():
        plain = load_model(out)
        torch.testing.assert_close(back(ids).logits, plain(ids).logits)
    # an export written before (codes beside the weights, no index) still loads with its codes
    (out / CODES_DIR / CODES_NAME).rename(out / CODES_NAME)
    (out / "model.safetensors.index.json").unlink()
    assert isinstance(secompress.load(out).model.layers[0].self_attn.q_proj, QuantizedLinear)


def test_streamed_dequantized_export_of_the_tied_reference_model(tmp_path):
    from transformers import AutoModelForCausalLM

    assert json.loads((REFERENCE / "config.json").read_text())["tie_word_embeddings"]
    cfg = QuantConfig(bits=4, group_size=32, protect_super_experts=False, format="dequantized")
    _, run = streamed(REFERENCE, Job(quant=cfg))
    run(None, tmp_path / "str", progress=False)
    model = load_model(REFERENCE, torch.float32)
    qplan = quantize_(model, cfg)
    save_quantized(model, None, qplan, tmp_path / "mem")
    a, b = _by_key(tmp_path / "mem"), _by_key(tmp_path / "str")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "lm_head.weight" not in a and a["model.embed_tokens.weight"].dtype == torch.bfloat16  # tied: once
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "str").eval()  # the dense bf16 weights
    ours = secompress.load(tmp_path / "str")  # the integer codes, computing in bf16
    assert stock.lm_head.weight.data_ptr() == stock.model.embed_tokens.weight.data_ptr()  # tied again on load
    with dequantized(ours):  # the very weights the codes give, in the export's dtype
        theirs = stock.state_dict()
        assert all(torch.equal(theirs[k], v) for k, v in ours.state_dict().items())
    with torch.no_grad():
        assert torch.isfinite(stock(torch.randint(3, 250, (1, 32))).logits).all()


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_exported_files_are_readable_as_the_umask_allows(tmp_path, mask, tokenizer):
    m = make_tiny("qwen3_moe", num_hidden_layers=2)
    outs = []
    old = os.umask(mask)
    try:
        plan = quantize_(m, QuantConfig(bits=4, group_size=8, symmetric=True, protect_super_experts=False))
        outs.append(save_quantized(m, tokenizer, plan, tmp_path / "ct"))
        m = make_tiny("qwen3_moe", num_hidden_layers=2)
        plan = quantize_(m, QuantConfig(bits=4, group_size=8, protect_super_experts=False, format="dequantized"))
        outs.append(save_quantized(m, tokenizer, plan, tmp_path / "dq"))
        m = make_tiny("qwen3_moe", num_hidden_layers=2)
        r = prune(m, tokenizer, PruneConfig(0.25, "frequency", calib_samples=2, seq_len=16, eval_samples=0))
        outs.append(save_pruned(m, tokenizer, r, tmp_path / "pr"))
    finally:
        os.umask(old)
    for out in outs:
        paths = [out, *out.rglob("*")]
        assert any(p.suffix == ".safetensors" for p in paths)
        for p in paths:
            want = (0o777 if p.is_dir() else 0o666) & ~mask
            assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_16bit_tensors_are_written_in_the_checkpoints_own_dtype(bf16_src, tmp_path, tokenizer):
    # float32 evaluation, bf16 checkpoint: the export is bf16, in memory and streamed alike
    pc = PruneConfig(0.25, "random", calib_samples=2, seq_len=16, eval_samples=0, protect_super_experts=False)
    from secompress.profile import ProfileConfig, profile

    model = load_model(bf16_src, torch.float32)
    prof = profile(model, tokenizer, config=ProfileConfig(num_samples=2, seq_len=16), progress=False)
    r = prune(model, tokenizer, pc, profile=prof)
    save_pruned(model, tokenizer, r, tmp_path / "mem")
    assert model.dtype == torch.float32  # the model itself is left as it was
    plan, run = streamed(bf16_src, Job(prune=pc), prof)
    assert plan.export_dtype == torch.bfloat16
    res = run(None, tmp_path / "str", tokenizer, progress=False)
    a, b = _by_key(tmp_path / "mem"), _by_key(tmp_path / "str")
    assert {t.dtype for t in a.values()} == {torch.bfloat16} and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for d in ("mem", "str"):
        assert json.loads((tmp_path / d / "config.json").read_text())["dtype"] == "bfloat16"
    assert res.export.ratio < 1  # pruned: smaller than the source
    # an explicit export dtype wins; a float32 checkpoint computed in bf16 is written in bf16
    _, run = streamed(bf16_src, Job(prune=pc, export_dtype=torch.float32), prof)
    run(None, tmp_path / "f32", tokenizer, progress=False)
    assert {t.dtype for t in _by_key(tmp_path / "f32").values()} == {torch.float32}
    f32_src = save_tiny(make_tiny("qwen3_moe", num_hidden_layers=2), tmp_path / "f32src")
    model = load_model(f32_src, torch.bfloat16)
    plan = quantize_(model, QuantConfig(bits=4, group_size=8, protect_super_experts=False, format="dequantized"))
    save_quantized(model, None, plan, tmp_path / "q")
    assert {t.dtype for k, t in _by_key(tmp_path / "q").items() if not k.endswith((".qweight", ".zeros", ".scales"))} \
        == {torch.bfloat16}


def test_every_export_states_its_size_and_ratio(bf16_src, tmp_path, tokenizer):
    src_bytes = sum(f.stat().st_size for f in bf16_src.glob("*.safetensors"))
    model = load_model(bf16_src)
    plan = quantize_(model, QuantConfig(bits=4, group_size=8, symmetric=True, protect_super_experts=False))
    out = save_quantized(model, tokenizer, plan, tmp_path / "ct")
    size = json.loads((out / PLAN_NAME).read_text())["export"]["size"]
    files = sorted(out.glob("*.safetensors"))
    assert size["bytes"] == sum(f.stat().st_size for f in files) == plan.artifacts["export"].bytes
    assert size["files"] == [f.name for f in files] and size["source_bytes"] == src_bytes
    assert size["ratio"] == round(size["bytes"] / src_bytes, 4) and size["ratio"] < 0.6
    assert "x the source's" in plan.artifacts["export"].describe()
    model = load_model(bf16_src)
    r = prune(model, tokenizer, PruneConfig(0.5, "frequency", calib_samples=2, seq_len=16, eval_samples=0,
                                            protect_super_experts=False))
    out = save_pruned(model, tokenizer, r, tmp_path / "pr")
    exp = json.loads((out / "prune_report.json").read_text())["export"]
    assert exp["format"] == "plain" and exp["bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 0.5 < exp["ratio"] < 0.9  # half the experts gone, attention and embeddings kept


def test_cli_scale_dtype_reaches_the_compressed_tensors_scales(bf16_src, tmp_path):
    from secompress.cli import main

    for sd, want in (("model", torch.bfloat16), ("float32", torch.float32)):
        out = tmp_path / sd
        assert main(["quantize", str(bf16_src), "--out", str(out), "--group-size", "8", "--scale-dtype", sd,
                     "--no-protect-super-experts", "--samples", "2", "--seq-len", "16", "--device", "cpu"]) == 0
        scales = {v.dtype for k, v in _by_key(out).items() if k.endswith("weight_scale")}
        assert scales == {want}, sd
