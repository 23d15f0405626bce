"""Issue 21: no compute on weights that are not in the checkpoint, no unpickler on model input, and
--overwrite replaces only what secompress wrote.

(a) The expected set, on all seven architectures: a clean tiny checkpoint passes; removing,
    reshaping or retyping any one stored tensor, or adding one, is refused naming it.
(b) Every command (profile, prune, quantize, run), in memory and --streaming, on corrupted
    checkpoints and hostile indexes: exit 2, one line naming the tensor or file, nothing written,
    and a hostile pickle's marker file never appears.
(c) Storage forms: tied heads, per-expert vs fused experts, block FP8, MXFP4, DeepSeek-V3's MTP
    layer, our own quantized exports (checked per module).
(d) --overwrite / --force.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from secompress.cli import main
from secompress.errors import CheckpointError, OutputExistsError
from secompress.integrity import check_modules, check_tensors, expected, no_unpickling, read_headers, verify
from secompress.outputs import FORCE, OWN_FILES, check_output_dir
from secompress.testing import TINY, make_tiny, save_tiny

ARCHS = sorted(TINY)
FAST = ["--samples", "2", "--seq-len", "16", "--batch-size", "2"]


def _config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


# ---- (a) the expected set, every architecture --------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_every_stored_tensor_is_needed_once_with_its_shape_and_dtype(arch, tiny_dir):
    folder = tiny_dir(arch)
    verify(folder)  # a clean checkpoint passes (the entry every loader calls)
    where, config = read_headers(folder), _config(folder)
    expect = expected(config)
    check = lambda w: check_tensors(w, config, folder, expect=expect)  # noqa: E731
    for key, (f, base, info) in where.items():
        with pytest.raises(CheckpointError, match=re.escape(f"tensor '{key}'") + ".*missing"):
            check({k: v for k, v in where.items() if k != key})
        wider = [*info["shape"][:-1], info["shape"][-1] + 1]
        with pytest.raises(CheckpointError, match=re.escape(f"tensor '{key}' has shape")):
            check({**where, key: (f, base, {**info, "shape": wider})})
        with pytest.raises(CheckpointError, match=re.escape(f"tensor '{key}' is stored as I32")):
            check({**where, key: (f, base, {**info, "dtype": "I32"})})
    n = config.num_hidden_layers + 1  # DeepSeek-V3 tolerates one MTP layer (layer n - 1) by default
    for extra in (f"model.layers.{n}.input_layernorm.weight", "model.layers.0.mlp.bogus.weight", "lm_head.bias"):
        with pytest.raises(CheckpointError, match=re.escape(f"tensor '{extra}'") + ".*not part of this"):
            check({**where, extra: next(iter(where.values()))})


def test_checkpoint_names_are_the_adapters(tiny_dir):
    """Mixtral's per-expert w1/w3/w2 under block_sparse_moe, GPT-OSS's fused tensors, DeepSeek-V3's
    score-correction bias (a persistent buffer the adapter names as a router tensor)."""
    for arch, key in (("mixtral", "model.layers.2.block_sparse_moe.experts.5.w2.weight"),
                      ("mixtral", "model.layers.0.block_sparse_moe.gate.weight"),
                      ("gpt_oss", "model.layers.1.mlp.experts.gate_up_proj"),
                      ("gpt_oss", "model.layers.1.mlp.experts.down_proj_bias"),
                      ("deepseek_v3", "model.layers.1.mlp.gate.e_score_correction_bias")):
        folder = tiny_dir(arch)
        where = read_headers(folder)
        assert key in where
        with pytest.raises(CheckpointError, match=re.escape(f"'{key}'")):
            check_tensors({k: v for k, v in where.items() if k != key}, _config(folder), folder)


def test_tied_head_may_be_absent_and_mtp_layers_are_tolerated_as_data(tmp_path):
    tied = save_tiny(make_tiny("qwen3_moe", num_hidden_layers=2, tie_word_embeddings=True), tmp_path / "tied")
    assert "lm_head.weight" not in read_headers(tied)
    verify(tied)
    ds = save_tiny(make_tiny("deepseek_v3", num_hidden_layers=2), tmp_path / "ds")
    sd = load_file(ds / "model.safetensors")
    for k in [k for k in sd if k.startswith("model.layers.1.")]:  # an MTP layer is a decoder layer after the last
        sd["model.layers.2." + k.removeprefix("model.layers.1.")] = sd[k].clone()
    save_file(sd, ds / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((ds / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    verify(ds)  # declared (the adapter's extra_layers_key names the config key): tolerated
    (ds / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match=re.escape("'model.layers.2.")):
        verify(ds)  # not declared: refused
    (ds / "config.json").write_text(json.dumps(cfg))
    assert main(["profile", str(ds), "--out", str(tmp_path / "p"), *FAST, "--no-plots", "--streaming"]) == 0


def test_block_fp8_needs_its_scale_grid(tmp_path):
    from secompress.testing import to_fp8

    src = save_tiny(make_tiny("deepseek_v3", num_hidden_layers=2), tmp_path / "bf")
    fp8 = to_fp8(src, tmp_path / "fp8", (16, 16))
    where, config = read_headers(fp8), _config(fp8)
    check_tensors(where, config, fp8)
    key = "model.layers.1.self_attn.q_a_proj.weight"  # [24, 64]: a 2 x 4 grid of 16 x 16 blocks
    f, base, info = where[key + "_scale_inv"]
    with pytest.raises(CheckpointError, match=re.escape(f"'{key}_scale_inv' has shape [1, 4]") + ".*needs \\[2, 4\\]"):
        check_tensors({**where, key + "_scale_inv": (f, base, {**info, "shape": [1, 4]})}, config, fp8)
    with pytest.raises(CheckpointError, match="refusing to read FP8 codes"):
        check_tensors({k: v for k, v in where.items() if k != key + "_scale_inv"}, config, fp8)


def _to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS's MXFP4: w [E, In, Out] -> blocks [E, Out, In/32, 16] (two E2M1 codes a byte, low nibble
    first), scales [E, Out, In/32] (E8M0: exponent + 127), as the published checkpoints store experts."""
    from transformers.integrations.mxfp4 import FP4_VALUES

    g = w.transpose(1, 2).float().unflatten(-1, (-1, 32))  # [E, Out, G, 32]
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)  # [E, Out, G]
    idx = (torch.ldexp(g, -exp.int()[..., None])[..., None] - torch.tensor(FP4_VALUES)).abs().argmin(-1)
    return (idx[..., 0::2] | (idx[..., 1::2] << 4)).to(torch.uint8), (exp + 127).to(torch.uint8)


def test_mxfp4_experts_are_checked_and_still_load(tmp_path):
    from secompress.checkpoints import load_model

    src = save_tiny(make_tiny("gpt_oss", num_hidden_layers=2), tmp_path / "bf")
    mx = Path(shutil.copytree(src, tmp_path / "mx"))
    sd = load_file(mx / "model.safetensors")
    for k in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        sd[k + "_blocks"], sd[k + "_scales"] = _to_mxfp4(sd.pop(k))
    save_file(sd, mx / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((mx / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (mx / "config.json").write_text(json.dumps(cfg))
    verify(mx)
    got = load_model(mx).model.layers[1].mlp.experts.gate_up_proj.float()
    want = load_model(src).model.layers[1].mlp.experts.gate_up_proj.float()
    assert got.shape == want.shape and (got - want).abs().max() <= want.abs().max() / 4  # 4-bit codes
    where, config = read_headers(mx), _config(mx)
    gone = "model.layers.1.mlp.experts.down_proj_scales"
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{gone}' is missing")):
        check_tensors({k: v for k, v in where.items() if k != gone}, config, mx)


def test_our_quantized_exports_are_checked_per_module(tmp_path):
    from secompress.quant import QuantConfig, quantize_, save_quantized

    model = make_tiny("qwen3_moe", num_hidden_layers=2)
    plan = quantize_(model, QuantConfig(bits=4, group_size=32, protect_super_experts=False))
    out = save_quantized(model, None, plan, tmp_path / "ct")
    where, config = read_headers(out), _config(out)
    verify(out, raw=True)
    assert verify(out).keys() == where.keys()  # and read as input (compressed-tensors, rebuilt weights)
    packed = "model.layers.1.mlp.experts.3.gate_proj.weight_packed"
    assert packed in where
    module = packed.rsplit(".", 1)[0]
    with pytest.raises(CheckpointError, match=re.escape(f"module '{module}'")):
        check_modules({k: v for k, v in where.items() if not k.startswith(module + ".")}, config, out)
    with pytest.raises(CheckpointError, match=re.escape("'model.layers.1.mlp.experts.8.gate_proj.weight_packed'")):
        check_modules({**where, "model.layers.1.mlp.experts.8.gate_proj.weight_packed": where[packed]}, config, out)


PEER = Path(__file__).parent / "fixtures" / "peer"
PEER_CT = sorted(p.name for p in PEER.iterdir() if (p / "config.json").is_file()
                 and "compressed-tensors" in (p / "config.json").read_text())


@pytest.mark.parametrize("name", PEER_CT)
def test_compressed_tensors_input_is_checked_as_the_model_sees_it(name, tmp_path):
    """llm-compressor's checkpoints (packed, act-order g_idx, asymmetric, ignore lists, W8 channel-wise):
    each quantized weight counts as present when its compression parameters are; dropping a scale,
    dropping a packed weight, reshaping the codes or adding a tensor is refused naming it."""
    pytest.importorskip("compressed_tensors")
    src = PEER / name
    assert verify(src)  # as it was written
    where, config = read_headers(src), _config(src)
    packed = next(k for k in sorted(where) if k.endswith("mlp.experts.1.gate_proj.weight_packed"))
    module = packed.removesuffix(".weight_packed")
    scale = module + ".weight_scale"
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{scale}' is missing")):
        check_tensors({k: v for k, v in where.items() if k != scale}, config, src)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{module}.weight' is missing")):
        check_tensors({k: v for k, v in where.items() if k != packed}, config, src)
    f, base, info = where[scale]
    halved = {**info, "shape": [info["shape"][0] // 2, *info["shape"][1:]]}
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{module}.weight' has shape")):
        check_tensors({**where, packed: (f, base, {**where[packed][2], "shape": [where[packed][2]["shape"][0] // 2,
                                                                                  where[packed][2]["shape"][1]]}),
                       scale: (f, base, halved)}, config, src)
    stray = "model.layers.0.mlp.experts.9.gate_proj.weight_scale"
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{stray}'")):
        check_tensors({**where, stray: where[scale]}, config, src)
    check_tensors({**where, module + ".input_scale": where[scale]}, config, src)  # activation scales: data


def test_compressed_tensors_input_refused_by_every_command_both_sources(tmp_path, monkeypatch, capsys):
    """A peer compressed-tensors checkpoint missing one expert's scale: exit 2 naming it, in memory and
    streamed, nothing written."""
    pytest.importorskip("compressed_tensors")
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.setenv("SECOMPRESS_CACHE", str(ws / "cache"))
    model = Path(shutil.copytree(PEER / "rtn-w4g16", ws / "model"))
    gone = "model.layers.1.mlp.experts.2.down_proj.weight_scale"
    _edit(lambda sd: sd.pop(gone))(model, ws)
    for streaming in (False, True):
        before = _tree(ws)
        rc = main(_argv("profile", streaming, model, ws))
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and f"tensor '{gone}' is missing" in err, err
        assert _tree(ws) == before


def test_the_files_of_a_checkpoint(tmp_path):
    """The index decides which files are read; both layouts at once, a shard named twice, an index that
    disagrees with the headers, or a config pointing transformers elsewhere are one line naming the file."""
    from secompress.integrity import checkpoint_files

    m = save_tiny(make_tiny("qwen3_moe", num_hidden_layers=2), tmp_path / "m")
    sd = load_file(m / "model.safetensors")
    save_file({"x": torch.zeros(2)}, str(m / "consolidated.safetensors"))  # not named: not part of it
    assert checkpoint_files(m) == [m / "model.safetensors"]
    index = m / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in sd}}))
    assert checkpoint_files(m) == [m / "model.safetensors"]  # an index naming just model.safetensors (convert tools)
    half = dict(list(sd.items())[: len(sd) // 2])
    save_file(half, str(m / "model-00001-of-00002.safetensors"))
    index.write_text(json.dumps({"weight_map": {k: "model-00001-of-00002.safetensors" for k in half}}))
    with pytest.raises(CheckpointError, match="ambiguous"):
        checkpoint_files(m)
    save_file({k: v for k, v in sd.items() if k not in half}, str(m / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" if k in half else "model-00002-of-00002.safetensors" for k in sd}
    index.write_text(json.dumps({"weight_map": wm}))
    (m / "model.safetensors").unlink()
    verify(m)  # sharded: fine
    key = next(iter(half))
    index.write_text(json.dumps({"weight_map": {**wm, key: "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=re.escape(f"puts '{key}' in 'model-00002-of-00002.safetensors'")):
        read_headers(m)
    save_file({**{k: v for k, v in sd.items() if k not in half}, key: half[key]},
              str(m / "model-00002-of-00002.safetensors"))
    index.write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{key}' is stored twice")):
        read_headers(m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(CheckpointError, match="transformers_weights 'adapter_model.bin'"):
        checkpoint_files(m)


# ---- (b) every command, both sources --------------------------------------------------------------
class _Marker:
    """Unpickling this writes a marker file: what a hostile .bin shard would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pickle ran')",))


def _edit(fn):
    def make(model: Path, ws: Path):
        sd = load_file(model / "model.safetensors")
        fn(sd)
        save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    return make


def _route(target: str, write):
    """An index that routes the final norm to ``target`` (written by ``write(tensors, path)``), the rest to
    a shard named to sort after it (transformers picks safetensors or torch.load by the first shard's name)."""
    def make(model: Path, ws: Path):
        sd = load_file(model / "model.safetensors")
        part = {"model.norm.weight": sd.pop("model.norm.weight")}
        save_file(sd, model / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
        (model / "model.safetensors").unlink()
        if write is not None:
            write(part, Path(target) if Path(target).is_absolute() else model / target, ws)
        wm = {k: "model-00002-of-00002.safetensors" for k in sd} | {k: target for k in part}
        (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return make


def _pickle_marker(part, path, ws):
    path.write_bytes(pickle.dumps(_Marker(str(ws / "MARKER"))))


def _experts(arch: str, layer: int = 1, expert: int = 3, proj: int = 2) -> str:
    from secompress.adapters import get_adapter

    a = get_adapter(arch)
    return f"model.layers.{layer}.{a.ckpt_block}.{a.experts}.{expert}.{a.ckpt_expert_names[proj]}.weight"


L = "model.layers.1."
CORRUPTIONS = {  # name -> (architectures, builder(model, ws), what the error line must name)
    "missing-o-proj": (("qwen3_moe", "mixtral"), _edit(lambda sd: sd.pop("model.layers.2.self_attn.o_proj.weight")),
                       "model.layers.2.self_attn.o_proj.weight"),
    "missing-norm": (("qwen3_moe",), _edit(lambda sd: sd.pop("model.layers.2.post_attention_layernorm.weight")),
                     "model.layers.2.post_attention_layernorm.weight"),
    "missing-expert": (("qwen3_moe", "mixtral"), None, "EXPERT"),
    "extra-expert": (("qwen3_moe",), _edit(lambda sd: sd.__setitem__(
        L + "mlp.experts.8.gate_proj.weight", sd[L + "mlp.experts.0.gate_proj.weight"].clone())),
        L + "mlp.experts.8.gate_proj.weight"),
    "wrong-shape-expert": (("qwen3_moe",), _edit(lambda sd: sd.__setitem__(
        L + "mlp.experts.3.up_proj.weight", sd[L + "mlp.experts.3.up_proj.weight"][:16].clone())),
        L + "mlp.experts.3.up_proj.weight"),
    "wrong-shape-fused-experts": (("gpt_oss",), _edit(lambda sd: sd.__setitem__(
        L + "mlp.experts.down_proj", sd[L + "mlp.experts.down_proj"][:7].clone())), L + "mlp.experts.down_proj"),
    "missing-router": (("qwen3_moe",), _edit(lambda sd: sd.pop(L + "mlp.gate.weight")), L + "mlp.gate.weight"),
    "missing-embeddings": (("qwen3_moe",), _edit(lambda sd: sd.pop("model.embed_tokens.weight")),
                           "model.embed_tokens.weight"),
    "index-bin-pickle": (("qwen3_moe",), _route("model-00001-of-00002.bin", _pickle_marker),
                         "model-00001-of-00002.bin"),
    "index-torch-save-bin": (("qwen3_moe",), _route("model-00001-of-00002.bin",
                                                    lambda part, p, ws: torch.save(part, p)),
                             "model-00001-of-00002.bin"),
    "index-etc-passwd": (("qwen3_moe",), _route("/etc/passwd", None), "/etc/passwd"),
    "index-outside-folder": (("qwen3_moe",), _route("../model-00001-of-00002.safetensors",
                                                    lambda part, p, ws: save_file(part, str(p))),
                             "../model-00001-of-00002.safetensors"),
}
COMMANDS = ("profile", "prune", "quantize", "run")
CELLS = [(c, arch, cmd, streaming) for c, (archs, _, _) in CORRUPTIONS.items() for arch in archs
         for cmd in COMMANDS for streaming in (False, True)]
RECIPE = """\
version: 1
name: tiny
model: {{id: {model}}}
data: {{num_samples: 2, seq_len: 16, batch_size: 2, eval_samples: 2}}
stages:
  - profile: {{}}
  - prune: {{ratio: 0.25, method: frequency}}
  - quantize: {{method: rtn, bits: 4, group_size: 32}}
  - evaluate: {{perplexity: true}}
  - export: {{}}
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = save_tiny(make_tiny(arch, num_hidden_layers=3), tmp_path_factory.mktemp(arch) / "m")
        return cache[arch]
    return get


def _argv(cmd: str, streaming: bool, model: Path, ws: Path) -> list[str]:
    out = str(ws / "out")
    if cmd == "run":
        (ws / "r.yaml").write_text(RECIPE.format(model=model))
        return ["run", str(ws / "r.yaml"), "--out", out, "--dry-run", "--streaming", "on" if streaming else "off"]
    extra = {"profile": ["--no-plots"], "prune": ["--ratio", "0.25", "--method", "frequency"],
             "quantize": ["--group-size", "32"]}[cmd]
    return [cmd, str(model), "--out", out, *FAST, *extra] + (["--streaming"] if streaming else [])


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case,arch,cmd,streaming", CELLS,
                         ids=[f"{c}-{a}-{cmd}{'-streaming' if s else ''}" for c, a, cmd, s in CELLS])
def test_every_command_refuses_a_bad_checkpoint_before_any_compute(case, arch, cmd, streaming, small, tmp_path,
                                                                   monkeypatch, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.setenv("SECOMPRESS_CACHE", str(ws / "cache"))
    model = Path(shutil.copytree(small(arch), ws / "model"))
    _, build, needle = CORRUPTIONS[case]
    if build is None:  # a missing per-expert weight, in the architecture's own checkpoint names
        needle = _experts(arch)
        build = _edit(lambda sd: sd.pop(needle))
    build(model, ws)
    argv = _argv(cmd, streaming, model, ws)
    before = _tree(ws)
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("secompress: error:")]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1, err
    assert needle in errors[0], errors[0]
    assert not (ws / "MARKER").exists()  # no unpickler ran
    assert _tree(ws) == before  # no output, no temporary, no cache entry


def test_no_unpickler_runs_even_if_the_index_check_were_bypassed(tmp_path, monkeypatch):
    """Defence in depth: with :func:`verify` switched off, transformers is handed the hostile .bin shard
    and ``no_unpickling`` still stops it; ``torch.load`` is itself again after the block."""
    import secompress.integrity
    from secompress.checkpoints import load_model

    model = save_tiny(make_tiny("qwen3_moe", num_hidden_layers=2), tmp_path / "m")
    _route("model-00001-of-00002.bin", _pickle_marker)(model, tmp_path)
    monkeypatch.setattr(secompress.integrity, "verify", lambda *a, **k: {})
    with pytest.raises(CheckpointError, match="refusing to unpickle .*model-00001-of-00002.bin"):
        load_model(model)
    assert not (tmp_path / "MARKER").exists()
    real = torch.load
    with no_unpickling(), pytest.raises(CheckpointError, match="refusing to unpickle"):
        torch.load(model / "model-00001-of-00002.bin", weights_only=False)
    assert torch.load is real and not (tmp_path / "MARKER").exists()


# ---- (d) --overwrite replaces only what secompress wrote -------------------------------------------
def test_overwrite_replaces_only_a_folder_secompress_wrote(tmp_path, monkeypatch, capsys, small):
    from secompress.prune.api import REPORT_NAME
    from secompress.quant.plan import PLAN_NAME

    assert {PLAN_NAME, REPORT_NAME, "super_experts.json"} <= set(OWN_FILES)  # the writers' own file names
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    thesis = tmp_path / "thesis"
    (thesis / ".git").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("four years of work")
    with pytest.raises(OutputExistsError, match="secompress did not write it"):
        check_output_dir(thesis, True)
    check_output_dir(thesis, FORCE)  # the user said so
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", True)
    argv = ["profile", str(small("qwen3_moe")), "--out", str(thesis), *FAST, "--no-plots"]
    assert main(argv + ["--overwrite"]) == 2
    assert "--force" in capsys.readouterr().err and (thesis / "thesis.tex").is_file() and (thesis / ".git").is_dir()
    assert main(argv + ["--overwrite", "--force"]) == 0 and not (thesis / "thesis.tex").exists()
    assert main(argv + ["--overwrite"]) == 0  # now a profile folder: --overwrite replaces it
    run = tmp_path / "run"
    for f in ("manifest.json", "recipe.yaml"):
        (run / f).parent.mkdir(exist_ok=True)
        (run / f).write_text("{}")
    check_output_dir(run, True)  # a run's folder
    (run / "recipe.yaml").unlink()
    with pytest.raises(OutputExistsError):
        check_output_dir(run, True)  # a web app's manifest.json alone is not ours
    evaluate = ["evaluate", str(small("qwen3_moe")), "--out", str(run), *FAST]
    assert main(evaluate + ["--overwrite"]) == 2 and "--force" in capsys.readouterr().err  # evaluate: the same rule
    assert (run / "manifest.json").is_file()
    (run / "manifest.json").unlink()
    (run / "evaluation.json").write_text("{}")
    check_output_dir(run, True)  # an evaluation's folder


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_gptq_reads_no_unverified_checkpoint(streaming, small, tmp_path, monkeypatch, capsys):
    """``quantize --method gptq`` (GPTQ in process, Hessians from the calibration stream) verifies
    the checkpoint like every other method: the hostile .bin index is refused before any compute,
    nothing is written and the pickle's marker never appears."""
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.setenv("SECOMPRESS_CACHE", str(ws / "cache"))
    model = Path(shutil.copytree(small("qwen3_moe"), ws / "model"))
    _route("model-00001-of-00002.bin", _pickle_marker)(model, ws)
    argv = ["quantize", str(model), "--out", str(ws / "q"), *FAST, "--group-size", "32", "--method", "gptq"]
    before = _tree(ws)
    rc = main(argv + (["--streaming"] if streaming else []))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "names 'model-00001-of-00002.bin' as a shard" in err, err
    assert _tree(ws) == before and not (ws / "MARKER").exists()
