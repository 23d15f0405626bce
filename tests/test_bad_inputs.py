"""What a first user hits (issue 14): every bad input is one line on stderr, exit status 2, no
traceback, and nothing left behind (no output, no temporary, no cache entry). Each case builds its
own broken input in a fresh folder and runs the CLI in-process; the folder's whole tree (output
root, cache, temporaries) is compared before and after."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from secompress.cli import main
from secompress.testing import make_tiny, save_tiny

GOOD_RECIPE = """\
version: 1
name: {name}
model: {{id: {model}, model_type: qwen3_moe}}
data: {{num_samples: 2, seq_len: 32, batch_size: 2, eval_samples: 2{data}}}
stages:
  - profile: {{}}
  - prune: {{ratio: 0.25, method: frequency}}
  - quantize: {{method: rtn, bits: 4, group_size: 32}}
  - evaluate: {{perplexity: true}}
  - export: {{}}
  - push: {{repo_id: someone/tiny, private: true}}
"""
FAST = ["--samples", "2", "--seq-len", "16"]


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    return save_tiny(make_tiny("qwen3_moe"), tmp_path_factory.mktemp("good") / "model")


def _copy(good: Path, ws: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(good, ws / name))


def _shard(m: Path) -> Path:
    return next(m.glob("*.safetensors"))


def _truncated(ws, good):
    m = _copy(good, ws)
    f = _shard(m)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return m, f.name


def _garbage_header(ws, good):
    m = _copy(good, ws)
    f = _shard(m)
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00not json at all, sorry\x01\x02\x03\x04\x05\x06\x07\x08"[:32]
    f.write_bytes(bytes(data))
    return m, f.name


def _huge_header_length(ws, good):
    m = _copy(good, ws)
    f = _shard(m)
    data = bytearray(f.read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    return m, f.name


def _tiny_file(ws, good):
    m = _copy(good, ws)
    _shard(m).write_bytes(b"\x01\x02")
    return m, _shard(m).name


def _missing_shard(ws, good):
    m = _copy(good, ws)
    f = _shard(m)
    keys = json.loads(f.read_bytes()[8: 8 + int.from_bytes(f.read_bytes()[:8], "little")])
    wm = {k: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
          for i, k in enumerate(k for k in keys if k != "__metadata__")}
    f.rename(m / "model-00001-of-00002.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return m, "model-00002-of-00002.safetensors"


def _bad_index(ws, good):
    m = _copy(good, ws)
    (m / "model.safetensors.index.json").write_text("{not json")
    return m, "model.safetensors.index.json"


def _nan_weights(ws, good):
    from safetensors.torch import load_file, save_file

    m = _copy(good, ws)
    f = _shard(m)
    sd = load_file(f)
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, f, metadata={"format": "pt"})
    return m, "'model.layers.1.mlp.experts.down_proj' (experts [3])"


def _no_config(ws, good):
    m = _copy(good, ws)
    (m / "config.json").unlink()
    return m, "config.json"


def _bad_config(ws, good):
    m = _copy(good, ws)
    (m / "config.json").write_text("{oops")
    return m, "model"


def _only_bin(ws, good):
    m = _copy(good, ws)
    _shard(m).rename(m / "pytorch_model.bin")
    return m, "safetensors"


BROKEN_MODELS = {"truncated": _truncated, "garbage_header": _garbage_header, "huge_header_length": _huge_header_length,
                 "two_byte_file": _tiny_file, "missing_shard": _missing_shard, "bad_index": _bad_index,
                 "no_config": _no_config, "bad_config": _bad_config, "only_bin": _only_bin}


def _recipe(ws: Path, model, name="tiny", data="", text=None) -> str:
    p = ws / "recipe.yaml"
    p.write_text(text if text is not None else GOOD_RECIPE.format(name=name, model=model, data=data))
    return str(p)


def _cmd(command: str, model: Path, ws: Path) -> list[str]:
    out = str(ws / "out")
    return {"profile": ["profile", str(model), "--out", out, *FAST],
            "prune": ["prune", str(model), "--ratio", "0.25", "--out", out],
            "quantize": ["quantize", str(model), "--out", out],
            "run": ["run", _recipe(ws, model), "--out", out, "--dry-run"]}[command]


# --- the matrix: name -> builder(ws, good_model, monkeypatch) -> (argv, text the message must name) ---
CASES = {}
for _name, _make in BROKEN_MODELS.items():
    for _command in ("profile", "run") if _name not in ("truncated", "missing_shard") else ("profile", "prune",
                                                                                            "quantize", "run"):
        def _case(ws, good, mp, _make=_make, _command=_command):
            model, needle = _make(ws, good)
            return _cmd(_command, model, ws), needle
        CASES[f"{_command}-{_name}"] = _case


def _case(fn):
    CASES[fn.__name__.removeprefix("case_").replace("_", "-")] = fn
    return fn


@_case
def case_run_nan_weights(ws, good, mp):
    model, key = _nan_weights(ws, good)
    return _cmd("run", model, ws), key


@_case
def case_profile_missing_model(ws, good, mp):
    return ["profile", str(ws / "nope"), "--out", str(ws / "out")], "nope"


@_case
def case_profile_dense_model(ws, good, mp):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    Qwen3ForCausalLM(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=300)).save_pretrained(ws / "dense")
    return ["profile", str(ws / "dense"), "--out", str(ws / "out")], "qwen3"


for _command in ("profile", "prune", "quantize", "run"):
    def _parent_is_file(ws, good, mp, _command=_command):
        (ws / "afile").write_text("x")
        argv = _cmd(_command, good, ws)
        argv[argv.index("--out") + 1] = str(ws / "afile" / "out")
        return argv, "afile"
    CASES[f"{_command}-out-parent-is-a-file"] = _parent_is_file

    def _disk_full(ws, good, mp, _command=_command):
        mp.setattr("secompress.outputs.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
        return _cmd(_command, good, ws), "free space"
    if _command != "profile":  # a profile is small: it needs no free-space estimate
        CASES[f"{_command}-disk-full"] = _disk_full


@_case
def case_profile_out_is_a_file(ws, good, mp):
    (ws / "out").write_text("x")
    return _cmd("profile", good, ws), "out"


@_case
def case_profile_out_exists(ws, good, mp):
    (ws / "out").mkdir()
    return _cmd("profile", good, ws), "--overwrite"


@_case
def case_run_out_exists(ws, good, mp):
    (ws / "out").mkdir()
    return _cmd("run", good, ws), "--overwrite"


@_case
def case_profile_out_is_cwd(ws, good, mp):
    return ["profile", str(good), "--out", ".", "--overwrite"], "'.'"


@_case
def case_profile_out_is_the_model(ws, good, mp):
    m = _copy(good, ws)
    return ["profile", str(m), "--out", str(m), "--overwrite"], "input"


@_case
def case_profile_out_is_a_symlink(ws, good, mp):
    (ws / "real").mkdir()
    (ws / "link").symlink_to(ws / "real")
    return ["profile", str(good), "--out", str(ws / "link"), "--overwrite"], "link"


@_case
def case_profile_write_fails_disk_full(ws, good, mp):
    def full(r, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    mp.setattr("secompress.profile_io.write_csv", full)
    return [*_cmd("profile", good, ws), "--no-plots"], "No space left"


@_case
def case_profile_data_missing(ws, good, mp):
    return [*_cmd("profile", good, ws), "--data", str(ws / "nodata.txt")], "nodata.txt"


@_case
def case_profile_data_empty(ws, good, mp):
    (ws / "empty.txt").write_text("  \n")
    return [*_cmd("profile", good, ws), "--data", str(ws / "empty.txt")], "empty"


@_case
def case_profile_data_bad_jsonl(ws, good, mp):
    (ws / "d.jsonl").write_text('{"text": "ok"}\n{broken\n')
    return [*_cmd("profile", good, ws), "--data", str(ws / "d.jsonl")], "d.jsonl"


@_case
def case_profile_bad_percentile(ws, good, mp):
    return [*_cmd("profile", good, ws), "--percentile", "150"], "percentile"


@_case
def case_prune_ratio_too_large(ws, good, mp):
    argv = _cmd("prune", good, ws)
    argv[argv.index("--ratio") + 1] = "1.5"
    return argv, "ratio"


@_case
def case_quantize_bad_rule(ws, good, mp):
    return [*_cmd("quantize", good, ws), "--rule", "no-equals-sign"], "no-equals-sign"


@_case
def case_prune_missing_profile(ws, good, mp):  # the path handling is issue 14's item for h1; the contract is here
    return [*_cmd("prune", good, ws), "--profile", str(ws / "noprofile")], "noprofile"


@_case
def case_run_recipe_missing(ws, good, mp):
    return ["run", str(ws / "none.yaml"), "--out", str(ws / "out")], "none.yaml"


def _recipe_case(name, needle, text=None, edit=None, extra=()):
    def build(ws, good, mp):
        t = GOOD_RECIPE.format(name="tiny", model=good, data="")
        if edit:
            t = edit(t)
        return ["run", _recipe(ws, good, text=text if text is not None else t), "--out", str(ws / "out"),
                "--dry-run", *extra], needle
    CASES[f"run-recipe-{name}"] = build


_recipe_case("yaml-syntax", "recipe.yaml", text="version: 1\nname: [unclosed\n")
_recipe_case("python-tag", "recipe.yaml", edit=lambda t: t.replace("name: tiny", "name: !!python/object/apply:os.getcwd []"))
_recipe_case("unknown-key", "colour", edit=lambda t: t.replace("version: 1", "version: 1\ncolour: red"))
_recipe_case("wrong-type", "num_samples", edit=lambda t: t.replace("num_samples: 2", "num_samples: two"))
_recipe_case("bad-version", "version", edit=lambda t: t.replace("version: 1", "version: 7"))
_recipe_case("stage-order", "prune", edit=lambda t: t.replace("  - profile: {}\n  - prune: {ratio: 0.25, method: frequency}",
                                                              "  - prune: {ratio: 0.25, method: frequency}\n  - profile: {}"))
_recipe_case("push-without-export", "export", edit=lambda t: t.replace("  - export: {}\n", ""))
_recipe_case("name-escapes", "name", edit=lambda t: t.replace("name: tiny", "name: ../../escape"))
_recipe_case("prune-ratio", "ratio", edit=lambda t: t.replace("ratio: 0.25", "ratio: 1.5"))
_recipe_case("quant-bits", "bits", edit=lambda t: t.replace("bits: 4", "bits: 5"))
_recipe_case("quant-method", "method", edit=lambda t: t.replace("method: rtn", "method: magic"))
_recipe_case("calibration-missing", "nocalib.txt",
             edit=lambda t: t.replace("eval_samples: 2", "eval_samples: 2, calibration: nocalib.txt"))
_recipe_case("model-missing", "nomodel", edit=lambda t: t.replace(str(t.split("id: ")[1].split(",")[0]), "nomodel/here/x"))
_recipe_case("override-unknown-key", "nosuchkey", extra=("--override", "stages.prune.nosuchkey=1"))
_recipe_case("override-no-equals", "stages.prune.ratio", extra=("--override", "stages.prune.ratio"))
_recipe_case("override-python-tag", "override", extra=("--override", "name=!!python/object/apply:os.getcwd []"))


@_case
def case_run_push_without_token(ws, good, mp):
    import huggingface_hub

    mp.delenv("HF_TOKEN", raising=False)
    mp.setenv("HF_HOME", str(ws / "hf"))
    mp.setattr(huggingface_hub, "get_token", lambda: None)
    argv = _cmd("run", good, ws)
    argv.remove("--dry-run")
    return argv, "HF_TOKEN"


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, good_model, monkeypatch, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.setenv("SECOMPRESS_CACHE", str(ws / "cache"))
    argv, needle = CASES[case](ws, good_model, monkeypatch)
    before = _tree(ws)
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("secompress: error:")]
    assert rc == 2, err
    assert "Traceback" not in err and len(errors) == 1, err
    assert needle in errors[0], errors[0]
    assert _tree(ws) == before  # no output, no temporary, no cache entry, nowhere in the folder
