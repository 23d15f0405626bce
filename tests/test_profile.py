import json

import numpy as np
import pytest
import torch

from conftest import ARCHS, SHARED_ARCHS
from secompress import ProfileConfig, profile, save_profile
from secompress.adapters import get_adapter
from secompress.cli import main
from secompress.errors import CalibrationError, OutputExistsError, SecompressError, UnsupportedModelError
from secompress.instrument import Recorder, instrument
from secompress.layout import defused
from secompress.profile_io import load_profile
from secompress.testing import make_tiny, plant_super_expert, save_tiny

SMALL = ProfileConfig(num_samples=6, seq_len=48, batch_size=3)


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_routed_super_expert_is_found_and_nothing_else(arch, tokenizer):
    model = make_tiny(arch)
    plant_super_expert(model, layer=2, expert=5, channel=11)
    r = profile(model, tokenizer, config=SMALL, progress=False)
    assert r.se_ids() == [(2, 5)]
    assert r.arrays["out_channel"][2, 5] == 11
    assert r.arrays["tokens"][2, 5] > 0


@pytest.mark.parametrize("arch", SHARED_ARCHS)
def test_planted_shared_super_expert_is_found(arch, tokenizer):
    model = make_tiny(arch)
    plant_super_expert(model, layer=1, expert="shared", channel=3)
    r = profile(model, tokenizer, config=SMALL, progress=False)
    assert r.se_ids() == [(1, "shared")]
    assert r.arrays["tokens"][1, r.num_experts] == SMALL.num_samples * SMALL.seq_len


def test_random_model_has_no_super_expert_above_the_max_ratio_gap(tokenizer):
    r = profile(make_tiny("qwen3_moe"), tokenizer, config=SMALL, progress=False)
    top = np.nanmax(r.arrays["out_max"])
    # a random model's maxima are all within a small factor of each other
    assert top / np.nanmedian(r.arrays["out_max"][r.arrays["tokens"] > 0]) < 10


@pytest.mark.parametrize("arch", ARCHS)
def test_instrumented_forward_matches_plain_forward_and_is_undone(arch, tokenizer):
    model = make_tiny(arch)
    ad = get_adapter(model.config)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with instrument(model, ad, Recorder(seq_len=40)):
            hooked = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, plain)
    for layer in ad.layers(model):
        block = ad.block_of(layer)
        if block is not None:
            assert "forward" not in vars(ad.experts_of(block))  # swap undone
            assert not ad.experts_of(block)._forward_hooks


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_is_identical_to_in_memory(arch, tiny_dir):
    path = tiny_dir(arch)
    a = profile(path, config=SMALL, progress=False)
    b = profile(path, config=ProfileConfig(num_samples=6, seq_len=48, batch_size=3, streaming=True), progress=False)
    assert a.super_experts == b.super_experts
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "qwen2_moe", "mixtral"])
def test_fused_and_per_expert_layouts_give_the_same_statistics(arch, tokenizer):
    model = make_tiny(arch)
    plant_super_expert(model, layer=1, expert=6)
    fused = profile(model, tokenizer, config=SMALL, progress=False)
    with defused(model, get_adapter(model.config)):
        per = profile(model, tokenizer, config=SMALL, progress=False)
    assert fused.se_ids() == per.se_ids() == [(1, 6)]
    for k in ("out_max", "in_max", "gate_sum", "norm_sum", "gated_norm_sum", "hidden_max"):
        np.testing.assert_allclose(per.arrays[k], fused.arrays[k], rtol=1e-4, err_msg=k)
    for k in ("tokens", "out_channel", "out_pos"):
        np.testing.assert_array_equal(per.arrays[k], fused.arrays[k], err_msg=k)


def test_massive_activation_and_sink_are_measured(tokenizer):
    model = make_tiny("qwen3_moe")
    r = profile(model, tokenizer, config=SMALL, progress=False)
    assert np.all(r.arrays["sink_mass"] > 0) and np.all(r.arrays["sink_mass"] <= 1)
    assert np.all(r.arrays["hidden_first_max"] <= r.arrays["hidden_max"])
    assert np.all(r.massive_ratios() > 0)


# ---- outputs ---------------------------------------------------------------------------------

def test_save_and_load_round_trip_with_schema(tmp_path, tokenizer):
    model = make_tiny("qwen2_moe")
    plant_super_expert(model, layer=0, expert=2, channel=9)
    r = profile(model, tokenizer, config=SMALL, progress=False)
    out = save_profile(r, tmp_path / "prof")
    meta = json.loads((out / "super_experts.json").read_text())
    assert meta["schema_version"] == 1
    assert meta["super_experts"][0]["layer"] == 0 and meta["super_experts"][0]["expert"] == 2
    assert meta["super_experts"][0]["channel"] == 9 and meta["super_experts"][0]["output_max"] > 0
    assert meta["rule"]["percentile"] == 99.5 and meta["data"]["sha256"] and meta["timestamp"]
    for f in ("expert_stats.csv", "se_heatmap.png", "layers.png", "arrays.npz"):
        assert (out / f).stat().st_size > 0
    back = load_profile(out)
    assert back.se_ids() == r.se_ids() and back.super_experts_normalised == r.super_experts_normalised
    rows = (out / "expert_stats.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 9  # header + layers x (8 experts + shared)


def test_cli_profile_end_to_end(tmp_path, tiny_dir, capsys):
    out = tmp_path / "p"
    assert main(["profile", str(tiny_dir("olmoe")), "--out", str(out), "--num-samples", "4", "--seq-len", "32",
                 "--no-plots"]) == 0
    assert (out / "super_experts.json").is_file()
    assert "first-token" in capsys.readouterr().out


# ---- bad input -------------------------------------------------------------------------------

def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SecompressError, match="does not exist"):
        profile(str(tmp_path / "nope"), progress=False)


def test_dense_checkpoint_is_rejected_before_loading_weights(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    Qwen3ForCausalLM(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, vocab_size=300)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="qwen3_moe"):
        profile(str(tmp_path), progress=False)


def test_empty_calibration_data(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(CalibrationError, match="empty"):
        profile(make_tiny("qwen3_moe"), tokenizer, data=str(empty), progress=False)


def test_nan_activations_are_reported_and_nothing_is_written(tmp_path, tiny_dir):
    model = make_tiny("mixtral")
    with torch.no_grad():
        get_adapter(model.config).experts_of(model.model.layers[1].mlp).down_proj[:] = float("nan")
    path = save_tiny(model, tmp_path / "nan")
    out = tmp_path / "out"
    assert main(["profile", str(path), "--out", str(out), "--num-samples", "2", "--seq-len", "16"]) == 2
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(CalibrationError, match="non-finite"):
        profile(str(path), config=SMALL, progress=False)


def test_existing_output_dir_needs_overwrite_and_is_kept(tmp_path, tiny_dir, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["profile", str(tiny_dir("qwen3_moe")), "--out", str(out), "--num-samples", "2", "--seq-len", "16"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    r = profile(tiny_dir("qwen3_moe"), config=SMALL, progress=False)
    with pytest.raises(OutputExistsError):
        save_profile(r, out)
    with pytest.raises(OutputExistsError, match="secompress did not write it"):
        save_profile(r, out, overwrite=True, plots=False)  # --overwrite replaces only what secompress wrote
    save_profile(r, out, overwrite="force", plots=False)
    assert (out / "super_experts.json").is_file() and not (out / "keep.txt").exists()
    save_profile(r, out, overwrite=True, plots=False)  # now it is secompress's own folder


def test_streaming_needs_a_path(tokenizer):
    with pytest.raises(SecompressError, match="streaming"):
        profile(make_tiny("olmoe"), tokenizer, config=ProfileConfig(streaming=True), progress=False)


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_dir):
    import shutil

    src = tiny_dir("qwen3_moe")
    dst = tmp_path / "bin"
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    (dst / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SecompressError, match="safetensors"):
        profile(str(dst), config=SMALL, progress=False)


def test_streaming_a_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from secompress.checkpoints import local_checkpoint

    with pytest.raises(SecompressError, match="safetensors shards of .* could not be downloaded"):
        local_checkpoint("some-org/not-cached-model", None)
