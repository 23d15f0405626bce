"""Published checkpoints as they are: block-scaled FP8 input (DeepSeek-V3/R1, Qwen3-FP8) and the
checkpoint's own dtype ("auto") for profiling, pruning, RTN and export."""
import json

import pytest
import torch
from safetensors import safe_open

import secompress

from secompress import fp8
from secompress.checkpoints import load_model
from secompress.cli import main
from secompress.errors import SecompressError
from secompress.fp8 import BlockFP8, UnsupportedQuantizationError
from secompress.profile import ProfileConfig, profile
from secompress.quant import QuantConfig, quantize_, save_quantized
from secompress.streaming import Checkpoint
from secompress.testing import make_tiny, plant_super_expert, save_tiny, to_fp8

SE = (1, 3)
BLOCK = (16, 16)  # q_a_proj [24, 64]: 1.5 blocks of rows
PROF = ProfileConfig(num_samples=4, seq_len=48, batch_size=4)


def _stored(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


# ---- the math (pure) ---------------------------------------------------------------------------
def test_block_dequantize_partial_blocks_by_hand():
    q = torch.ones(40, 24).to(fp8.FP8_DTYPE)  # blocks of 16: rows 16+16+8, cols 16+8
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # [3, 2]
    w = fp8.dequantize(q, s, BLOCK)
    assert w[0, 0] == 1 and w[15, 16] == 2 and w[16, 15] == 3 and w[39, 23] == 6 and w[32, 0] == 5
    with pytest.raises(SecompressError, match=r"scale grid \(3, 2\)"):
        fp8.dequantize(q, s[:2], BLOCK)


def test_quantize_round_trip_within_fp8_step():
    torch.manual_seed(0)
    w = torch.randn(40, 24) * torch.logspace(-3, 2, 24)  # columns of very different size
    q, s = fp8.quantize(w, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    back = fp8.dequantize(q, s, BLOCK)
    blockmax = fp8._expand(s * fp8.FP8_MAX, (40, 24), BLOCK)
    assert ((back - w).abs() <= blockmax / 16 + 1e-12).all()  # 3 mantissa bits: half a step <= 1/16 of max
    assert ((back - w).abs() <= w.abs() / 16 + blockmax * 2**-9).all()  # relative, subnormals aside


@pytest.mark.parametrize("qc", [
    {"quant_method": "gptq", "bits": 4}, {"quant_method": "awq"}, {"quant_method": "bitsandbytes"},
    {"quant_method": "compressed-tensors"}, {"quant_method": "fp8"},  # per-tensor FP8: no block size
    {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}])
def test_unknown_quantization_is_refused(qc):
    with pytest.raises(UnsupportedQuantizationError):
        BlockFP8.from_config(qc)


def test_official_deepseek_config_is_understood():
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    assert BlockFP8.from_config(qc).block == (128, 128) and BlockFP8.from_config(None) is None


# ---- a tiny DeepSeek-V3 in FP8 -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    m = make_tiny("deepseek_v3").to(torch.bfloat16)
    plant_super_expert(m, *SE)
    root = tmp_path_factory.mktemp("fp8")
    bf16 = save_tiny(m, root / "bf16")
    return bf16, to_fp8(bf16, root / "fp8", BLOCK)


def test_fixture_is_laid_out_like_the_official_checkpoints(ckpts):
    _, path = ckpts
    t = _stored(path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    assert cfg["quantization_config"]["weight_block_size"] == list(BLOCK)
    e = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert t[e].dtype == torch.float8_e4m3fn and t[e + "_scale_inv"].dtype == torch.float32
    assert t["model.layers.1.self_attn.q_a_proj.weight_scale_inv"].shape == (2, 4)  # 24 rows: a partial block
    assert t["model.layers.1.mlp.shared_experts.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert t["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float8_e4m3fn  # dense first layer
    for k in ("model.layers.1.mlp.gate.weight", "lm_head.weight", "model.embed_tokens.weight",
              "model.layers.1.input_layernorm.weight"):
        assert t[k].dtype == torch.bfloat16 and k + "_scale_inv" not in t


def test_fp8_gives_the_same_super_experts_in_memory_and_streamed(ckpts):
    bf16, path = ckpts
    ref = profile(bf16, config=PROF, progress=False)
    assert ref.se_ids() == [SE]
    channels = lambda r: [int(r.arrays["out_channel"][l, c]) for l, c in r.super_experts]  # noqa: E731
    for streaming in (False, True):
        r = profile(path, config=ProfileConfig(**{**PROF.__dict__, "streaming": streaming}), progress=False)
        assert r.se_ids() == ref.se_ids() and channels(r) == channels(ref) == [7]
        torch.testing.assert_close(torch.tensor(r.arrays["out_max"][SE]), torch.tensor(ref.arrays["out_max"][SE]),
                                   rtol=0.1, atol=0)  # FP8 weights: close, not equal


def test_in_memory_fp8_is_dequantized_block_by_block(ckpts):
    bf16, path = ckpts
    m = load_model(path)
    assert m.dtype == torch.bfloat16 and getattr(m.config, "quantization_config", None) is None
    ckpt = Checkpoint(path)
    with ckpt.reading():
        want = fp8.dequantize(ckpt.get_stored("model.layers.1.self_attn.q_a_proj.weight"),
                              ckpt.get_stored("model.layers.1.self_attn.q_a_proj.weight_scale_inv"), BLOCK)
    assert torch.equal(m.model.layers[1].self_attn.q_a_proj.weight, want.to(torch.bfloat16))
    orig = load_model(bf16).model.layers[1].self_attn.q_a_proj.weight.float()
    assert (want - orig).abs().max() <= orig.abs().max() / 16  # partial rows 16..23 scaled by their own block


def test_unreadable_quantization_is_refused_before_reading_codes(ckpts, tmp_path):
    import shutil

    _, path = ckpts
    for name, edit in (("gptq", lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4})),
                       ("noqc", lambda c: c.pop("quantization_config"))):
        bad = tmp_path / name
        shutil.copytree(path, bad)
        cfg = json.loads((bad / "config.json").read_text())
        edit(cfg)
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(SecompressError, match="gptq|refusing to read FP8 codes"):
            profile(bad, config=ProfileConfig(**{**PROF.__dict__, "streaming": True}), progress=False)
        with pytest.raises(SecompressError, match="gptq|refusing to read FP8 codes"):
            load_model(bad)
        assert main(["profile", str(bad), "--streaming", "--out", str(tmp_path / f"p-{name}"), "--samples", "2",
                     "--seq-len", "32", "--no-plots"]) == 2


def _stock(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_pruned_fp8_stays_fp8_and_reloads(ckpts, tmp_path):
    _, path = ckpts
    out = tmp_path / "pruned"
    assert main(["prune", str(path), "--ratio", "0.25", "--out", str(out), "--samples", "4", "--eval-samples", "2",
                 "--seq-len", "48"]) == 0
    rep = json.loads((out / "prune_report.json").read_text())
    kept = {d["layer"]: d["kept"] for d in rep["layers"]}
    assert SE[1] in kept[SE[0]] and len(kept[1]) == 6
    src, dst = _stored(path), _stored(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["n_routed_experts"] == 6
    for layer, ids in kept.items():
        for new, old in enumerate(ids):
            for p in ("gate_proj", "up_proj", "down_proj"):
                for s in ("weight", "weight_scale_inv"):
                    a = dst[f"model.layers.{layer}.mlp.experts.{new}.{p}.{s}"]
                    b = src[f"model.layers.{layer}.mlp.experts.{old}.{p}.{s}"]
                    assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert f"model.layers.{layer}.mlp.experts.6.up_proj.weight" not in dst
        gate = dst[f"model.layers.{layer}.mlp.gate.weight"]
        assert gate.dtype == torch.bfloat16 and torch.equal(gate, src[f"model.layers.{layer}.mlp.gate.weight"][ids])
    nbytes = lambda d: sum(t.numel() * t.element_size() for t in d.values())  # noqa: E731
    gone = {k: t for k, t in src.items() if any(f"layers.{l}.mlp.experts.{e}." in k
                                                for l, ids in kept.items() for e in range(8) if e not in ids)}
    router_rows = nbytes({k: t for k, t in src.items() if ".mlp.gate." in k}) * 2 // 8  # 2 of 8 rows go
    assert nbytes(dst) == nbytes(src) - nbytes(gone) - router_rows  # FP8 in, FP8 out (not 2-4x)
    stock = _stock(out)
    ex = stock.model.layers[1].mlp.experts
    assert tuple(ex.gate_up_proj.shape) == (6, 64, 64) and tuple(ex.down_proj.shape) == (6, 64, 32)
    ours = load_model(out)  # our block-exact dequantization; stock agrees where the block divides (experts)
    torch.testing.assert_close(ex.down_proj.float(), ours.model.layers[1].mlp.experts.down_proj.float())
    ids = torch.arange(2, 40).view(2, 19)
    with torch.no_grad():
        assert torch.isfinite(stock(ids).logits).all() and torch.isfinite(ours(ids).logits).all()


def test_rtn_from_fp8_exports_a_loadable_checkpoint(ckpts, tmp_path):
    _, path = ckpts
    m = load_model(path, "float32")
    plan = quantize_(m, QuantConfig(bits=4, group_size=8, protect_super_experts=False, format="dequantized"))
    save_quantized(m, None, plan, tmp_path / "q")  # an FP8 source's 16-bit dtype: bf16, though computed in float32
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    ids = torch.arange(2, 40).view(2, 19)
    with torch.no_grad():
        r, ours = _stock(tmp_path / "q"), secompress.load(tmp_path / "q")  # dense bf16 vs the codes, computed in bf16
        assert r.dtype == ours.dtype == torch.bfloat16
        torch.testing.assert_close(r(ids).logits, ours(ids).logits, atol=2e-2, rtol=2e-2)
    save_quantized(m, None, plan, tmp_path / "q32", dtype=torch.float32)  # an explicit dtype: float32
    r = _stock(tmp_path / "q32")
    with torch.no_grad():
        torch.testing.assert_close(r(ids).logits, m(ids).logits, atol=1e-4, rtol=1e-4)


# ---- the checkpoint's own dtype ----------------------------------------------------------------
def test_bf16_checkpoint_pruned_with_defaults_stays_bf16_bit_identical(tmp_path):
    src_dir = save_tiny(make_tiny("qwen3_moe").to(torch.bfloat16), tmp_path / "bf16")
    assert ProfileConfig().dtype == "auto"
    out = tmp_path / "pruned"
    assert main(["prune", str(src_dir), "--ratio", "0.25", "--out", str(out), "--samples", "4",
                 "--eval-samples", "2", "--seq-len", "48"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    kept = {d["layer"]: d["kept"] for d in json.loads((out / "prune_report.json").read_text())["layers"]}
    src, dst = _stored(src_dir), _stored(out)
    assert {t.dtype for t in dst.values()} == {torch.bfloat16}
    for layer, ids in kept.items():
        for new, old in enumerate(ids):
            for p in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(dst[f"model.layers.{layer}.mlp.experts.{new}.{p}.weight"],
                                   src[f"model.layers.{layer}.mlp.experts.{old}.{p}.weight"])
    assert torch.equal(dst["model.layers.0.self_attn.q_proj.weight"], src["model.layers.0.self_attn.q_proj.weight"])
