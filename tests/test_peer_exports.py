"""compressed-tensors checkpoints written by other tools (llm-compressor 0.14: tests/fixtures/peer, made by
evals/peer/make_fixtures.py) are read by secompress.load, profile, prune and perplexity evaluation,
in memory and streamed, through compressed-tensors' own decompressors (:mod:`secompress.ct_read`).

"Equal" below means bit-identical: the same stored codes and scales go through the same
decompressor (weights), or the same weights through the same layers on the same batch shapes
(streamed vs in-memory perplexity with one batch size). "Within the 4-bit error": the logits'
relative error ``||logits - original|| / ||original||`` is at most 1.5x the error of secompress's
own 4-bit RTN (symmetric, group 16) of the same original; a reader that ignores ``g_idx`` is
shown to exceed it.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import secompress
from secompress.checkpoints import load_model
from secompress.cli import main
from secompress.ct_read import CTReader, resolve_group
from secompress.errors import SecompressError
from secompress.perplexity import mean_loss
from secompress.profile import ProfileConfig, profile
from secompress.streaming import Checkpoint

pytest.importorskip("compressed_tensors", reason="needs the ct extra")
FIX = Path(__file__).resolve().parent / "fixtures" / "peer"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
EXPORTS = sorted(MANIFEST["exports"])
SE = (0, 3)  # planted by make_fixtures.py
GIDX = "gidx-w4g16-asym"
PROF = dict(num_samples=4, seq_len=48, batch_size=2)


def _arch(name: str) -> str:
    return MANIFEST["exports"][name]["arch"]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def stored():
    return load_file(str(FIX / "logits.safetensors"))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def rtn_bound(stored):
    """arch -> 1.5x the logits error of secompress's own 4-bit RTN (symmetric, group 16) of the original."""
    from secompress.quant.api import QuantConfig, quantize_

    out = {}
    for arch in ("qwen3_moe", "qwen2_moe"):
        m = load_model(FIX / f"original-{arch}", torch.float32)
        quantize_(m, QuantConfig(bits=4, group_size=16, symmetric=True, protect_super_experts=False,
                                 format="dequantized"))
        out[arch] = 1.5 * _rel(_logits(m, stored["ids"]), stored[f"original/{arch}"])
    return out


def test_fixtures_are_what_llm_compressor_wrote():
    assert MANIFEST["made_with"]["llmcompressor"] == "0.14.0"
    for name in EXPORTS:
        qc = json.loads((FIX / name / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized", name
    h = Checkpoint(FIX / GIDX).headers()
    assert h["model.layers.0.mlp.experts.1.down_proj.weight_g_idx"]["dtype"] == "I32"
    assert "model.layers.0.mlp.experts.1.down_proj.weight_zero_point" in h
    qc = json.loads((FIX / GIDX / "config.json").read_text())["quantization_config"]
    assert next(iter(qc["config_groups"].values()))["weights"]["actorder"] == "group"


MIXED = "ignore-modules-w8"  # two config groups, the `Linear` one first (as llm-compressor 0.14 orders them)


@pytest.mark.parametrize("name", [n for n in EXPORTS if n not in (GIDX, MIXED)])
def test_every_weight_equals_compressed_tensors_own_dequantization(name):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    theirs = CompressedTensorsDequantizer(FIX / name, dtype=torch.float32).process(
        load_file(str(FIX / name / "model.safetensors")))
    ckpt = Checkpoint(FIX / name)
    assert ckpt.ct is not None and len(ckpt.ct.weights) >= 20
    with ckpt.reading():
        for key in ckpt.ct.weights:
            assert torch.equal(ckpt.get(key).float(), theirs[key]), key
        for key in ckpt.tensor_infos():  # what get() presents: no compression parameter, every weight
            assert not key.endswith(("_packed", "_scale", "_shape", "_zero_point"))


def test_two_groups_resolve_like_compressed_tensors_applies_them():
    """Each weight of the two-group export equals compressed-tensors' decompressor run with the scheme that
    compressed-tensors' own ``match_targets`` picks (the precedence ``apply_quantization_config`` uses). Its
    model-free ``CompressedTensorsDequantizer`` (0.20.1) instead takes the groups in file order, so the
    ``Linear`` group claims layer 1's int8 attention and decodes it as int4: garbage, shown here."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_targets

    qc = QuantizationConfig.model_validate(json.loads((FIX / MIXED / "config.json").read_text())["quantization_config"])
    owner = {t: s for s in qc.config_groups.values() for t in s.targets}
    files = load_file(str(FIX / MIXED / "model.safetensors"))
    orig = load_file(str(FIX / "original-qwen3_moe" / "model.safetensors"))
    ckpt = Checkpoint(FIX / MIXED)
    widths = set()
    with ckpt.reading():
        for key in ckpt.ct.weights:
            m = key.removesuffix(".weight")
            scheme = owner[match_targets(m, torch.nn.Linear(1, 1), owner)[0]]
            comp = BaseCompressor.get_value_from_registry(scheme.format)
            sd = {n: files[f"{m}.{n}"] for n in comp.compression_param_names(scheme)}
            assert torch.equal(ckpt.get(key), comp.decompress(sd, scheme)["weight"]), key
            widths.add(scheme.weights.num_bits)
        q = "model.layers.1.self_attn.q_proj.weight"  # int8, channel-wise
        assert _rel(ckpt.get(q).float(), orig[q].float()) < 0.01
    assert widths == {4, 8}
    theirs = CompressedTensorsDequantizer(FIX / MIXED, dtype=torch.float32).process(dict(files))
    assert _rel(theirs[q], orig[q].float()) > 0.5  # the upstream model-free dequantizer's misreading


def test_act_order_g_idx_is_honoured_column_by_column():
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    ckpt = Checkpoint(FIX / GIDX)
    m = "model.layers.0.mlp.experts.3.down_proj"
    with ckpt.reading():
        g = ckpt.get_stored(f"{m}.weight_g_idx").long()  # [In]
        s = ckpt.get_stored(f"{m}.weight_scale")  # [O, G] bf16
        shape = torch.Size(ckpt.get_stored(f"{m}.weight_shape").tolist())
        q = unpack_from_int32(ckpt.get_stored(f"{m}.weight_packed"), 4, shape)  # [O, In]
        z = unpack_from_int32(ckpt.get_stored(f"{m}.weight_zero_point"), 4, torch.Size((shape[0], s.shape[1])),
                              packed_dim=0)
        got = ckpt.get(f"{m}.weight")
    assert not torch.equal(g, torch.arange(shape[1]) // 16)  # really out of column order
    want = (q.float() - z[:, g].float()) * s[:, g].float()  # column j: its own group's scale and zero point
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=0)  # bf16: one rounding of the product


@pytest.mark.parametrize("name", EXPORTS)
def test_logits_within_the_4bit_error(name, stored, rtn_bound):
    model = secompress.load(FIX / name, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None  # real weights in memory
    err = _rel(_logits(model, stored["ids"]), stored[f"original/{_arch(name)}"])
    assert 0 < err <= rtn_bound[_arch(name)], (name, err, rtn_bound)


def test_ignoring_g_idx_would_fail_the_bound(stored, rtn_bound, monkeypatch):
    import secompress.ct_read as ct_read

    monkeypatch.setattr(ct_read, "G_IDX", "no_g_idx")  # a reader blind to act-order
    err = _rel(_logits(load_model(FIX / GIDX, torch.float32), stored["ids"]), stored["original/qwen3_moe"])
    assert err > 2 * rtn_bound["qwen3_moe"]


@pytest.mark.parametrize("name", ["rtn-w4g16", "ignore-layer"])
def test_logits_equal_a_checkpoint_compressed_tensors_dequantized(name, tmp_path, stored):
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    convert_checkpoint(FIX / name, tmp_path / "plain", CompressedTensorsDequantizer(FIX / name), max_workers=1)
    theirs = load_model(tmp_path / "plain", torch.float32)
    ours = load_model(FIX / name, torch.float32)
    assert torch.equal(_logits(ours, stored["ids"]), _logits(theirs, stored["ids"]))


def test_ignore_by_regex_reads_like_ignore_by_name(tmp_path):
    """llm-compressor writes its `ignore` regexes out as names; other writers keep `re:` (secompress's own)."""
    re_copy = tmp_path / "re"
    shutil.copytree(FIX / "ignore-layer", re_copy)
    cfg = json.loads((re_copy / "config.json").read_text())
    names = cfg["quantization_config"]["ignore"]
    cfg["quantization_config"]["ignore"] = [n for n in names if ".experts." not in n] + \
        [r"re:model\.layers\.0\.mlp\.experts\.\d+\.(gate|up|down)_proj$"]
    (re_copy / "config.json").write_text(json.dumps(cfg))
    a, b = Checkpoint(FIX / "ignore-layer"), Checkpoint(re_copy)
    assert set(a.ct.weights) == set(b.ct.weights)
    assert not any(k.startswith("model.layers.0.mlp.experts.") for k in a.ct.weights)  # the ignored layer: bf16
    with a.reading(), b.reading():
        for k in a.tensor_infos():
            assert torch.equal(a.get(k), b.get(k)), k


def test_group_resolution_follows_compressed_tensors():
    """ignore first; then exact name, regex, class target; a target in two groups belongs to the later one."""
    from compressed_tensors.utils.match import match_targets

    groups = {"a": ["Linear"], "b": ["re:.*experts\\.\\d+\\.down_proj$"], "c": ["m.experts.1.down_proj"],
              "d": ["re:.*\\.q_proj$"], "e": ["re:.*\\.q_proj$"]}
    linear = torch.nn.Linear(2, 2)
    owner = {t: g for g, ts in groups.items() for t in ts}
    for name, want in (("m.experts.1.down_proj", "c"), ("m.experts.2.down_proj", "b"), ("m.experts.2.up_proj", "a"),
                       ("m.q_proj", "e")):
        assert resolve_group(name, groups, []) == want
        assert owner[match_targets(name, linear, owner)[0]] == want  # compressed-tensors' own precedence
    assert resolve_group("m.experts.1.down_proj", groups, ["re:m\\.experts\\.1\\."]) is None
    assert resolve_group("x", {"g": ["re:y"]}, []) is None


def _edited(tmp_path, name, edit):
    dst = tmp_path / name
    shutil.copytree(FIX / "rtn-w4g16", dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name, edit, match", [
    ("sparse", lambda q: q.update(sparsity_config={"format": "sparse-bitmask", "targets": ["Linear"]}),
     "sparsity compression"),
    ("transform", lambda q: q.update(transform_config={"config_groups": {"u": {"type": "hadamard", "apply": []}}}),
     "transform_config"),
    ("nvfp4", lambda q: q["config_groups"]["group_0"].update(format="nvfp4-pack-quantized"), "nvfp4"),
    ("untargeted", lambda q: q["config_groups"]["group_0"].update(targets=["re:.*self_attn.*"]), "matches no config"),
    ("ignored", lambda q: q["ignore"].append("model.layers.1.mlp.experts.2.up_proj"), "is in `ignore`"),
    ("garbled", lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits="four"), "does not parse"),
])
def test_unreadable_checkpoints_are_refused_before_any_weight_is_read(tmp_path, monkeypatch, name, edit, match):
    bad = _edited(tmp_path, name, edit)

    def no_read(*a, **k):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(Checkpoint, "get_stored", no_read)
    with pytest.raises(SecompressError, match=match) as e:
        load_model(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(SecompressError, match=match):
        profile(bad, config=ProfileConfig(**PROF, streaming=True), progress=False)


def test_float_quantized_fp8_reads_through_compressed_tensors(tmp_path, stored):
    """A float-quantized (FP8 weights, channel scales) checkpoint written by compressed-tensors' own compressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    src = FIX / "original-qwen3_moe"
    dst = tmp_path / "fp8"
    shutil.copytree(src, dst)
    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="float-quantized")
    comp = BaseCompressor.get_value_from_registry("float-quantized")
    out = {}
    for k, t in load_file(str(src / "model.safetensors")).items():
        if k.endswith("proj.weight"):
            scale, zp = calculate_qparams(t.amin(1, keepdim=True), t.amax(1, keepdim=True), args)  # [O, 1]
            out.update({f"{k[:-7]}.{n}": v for n, v in comp.compress({"weight": t, "weight_scale": scale}, scheme).items()})
        else:
            out[k] = t
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = QuantizationConfig(config_groups={"g": scheme}, ignore=["lm_head"],
                                                    format="float-quantized", quantization_status="compressed"
                                                    ).model_dump()
    cfg["quantization_config"]["quant_method"] = "compressed-tensors"
    (dst / "config.json").write_text(json.dumps(cfg))
    ckpt = Checkpoint(dst)
    assert ckpt.headers()["model.layers.0.mlp.experts.3.down_proj.weight"]["dtype"] == "F8_E4M3"
    err = _rel(_logits(load_model(dst, torch.float32), stored["ids"]), stored["original/qwen3_moe"])
    assert 0 < err < 0.05  # 3 mantissa bits per weight


def test_profile_finds_the_planted_super_expert_in_memory_and_streamed():
    for name in ("rtn-w4g16", GIDX, "ignore-layer", "qwen2-rtn-w4g16"):
        runs = [profile(FIX / name, config=ProfileConfig(**PROF, streaming=s), progress=False) for s in (False, True)]
        assert runs[0].se_ids() == runs[1].se_ids() == [SE], name


def test_streamed_perplexity_equals_in_memory():
    from test_streamed import streamed

    from secompress.compress import Job

    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    for name in (GIDX, "ignore-modules-w8"):
        mem = mean_loss(load_model(FIX / name, torch.float32), ids, 2)
        _, go = streamed(FIX / name, Job(batch_size=2))
        assert go(ids, progress=False).loss_before == mem, name  # the same batches of 2: bit-identical


@pytest.mark.parametrize("streaming", [False, True])
def test_pruned_peer_export_is_written_unquantized(tmp_path, streaming):
    name = "ignore-modules-w8"
    out = tmp_path / "pruned"
    argv = ["prune", str(FIX / name), "--ratio", "0.25", "--out", str(out), "--samples", "4", "--seq-len", "48"]
    assert main(argv + (["--streaming"] if streaming else [])) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    report = json.loads((out / "prune_report.json").read_text())
    kept = next(x["kept"] for x in report["layers"] if x["layer"] == SE[0])
    assert SE[1] in kept  # the Super Expert is never pruned
    written = load_file(str(out / "model.safetensors"))
    assert not any(k.endswith(("_packed", "_scale", "_shape")) for k in written)
    src = Checkpoint(FIX / name)
    with src.reading():
        assert torch.equal(written["model.layers.1.self_attn.q_proj.weight"],  # int8 group: dequantized as stored
                           src.get("model.layers.1.self_attn.q_proj.weight"))
        new = kept.index(SE[1])
        assert torch.equal(written[f"model.layers.0.mlp.experts.{new}.down_proj.weight"],  # the ignored SE: bf16
                           src.get(f"model.layers.0.mlp.experts.{SE[1]}.down_proj.weight"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # a plain checkpoint now


def test_reader_describes_what_it_found():
    r = CTReader(json.loads((FIX / "ignore-modules-w8" / "config.json").read_text())["quantization_config"],
                 Checkpoint(FIX / "ignore-modules-w8").headers())
    assert "int8 sym channel" in r.describe() and "int4 sym group 16" in r.describe()
    assert "model.layers.0.mlp.experts.3.down_proj.weight" not in r.weights  # explicitly ignored SE projection
    assert "model.layers.0.self_attn.o_proj.weight" not in r.weights


def test_streamed_plan_sizes_count_the_dequantized_weights():
    from secompress.compress import checkpoint_sizes

    disk, layer, rest, total = checkpoint_sizes(Checkpoint(FIX / "rtn-w4g16"), "model.layers", torch.bfloat16)
    _, layer0, rest0, total0 = checkpoint_sizes(Checkpoint(FIX / "original-qwen3_moe"), "model.layers", torch.bfloat16)
    assert (layer, rest, total) == (layer0, rest0, total0)  # in memory, as large as the bf16 original
    assert disk < 0.7 * sum(f.stat().st_size for f in (FIX / "original-qwen3_moe").glob("*.safetensors"))


def test_secompress_own_export_is_read_dequantized_by_every_command(tmp_path):
    """load_model (profile, prune, evaluate) reads secompress's own compressed-tensors export too; secompress.load
    still gives its integer-coded modules."""
    from test_compressed_tensors import _quantized

    from secompress.quant.formats.ct import save_ct
    from secompress.quant.fused import FusedQuantizedExperts

    _, m, plan = _quantized("qwen3_moe")  # layer 1 (the Super Expert's) 16-bit, in `ignore` by regex
    out = save_ct(m, None, plan, tmp_path / "ct")
    coded = secompress.load(out)
    assert any(isinstance(x, FusedQuantizedExperts) for x in coded.modules())
    plain = load_model(out, torch.float32)
    assert not any(isinstance(x, FusedQuantizedExperts) for x in plain.modules())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = _logits(coded, ids), _logits(plain, ids)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
