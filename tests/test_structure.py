"""Structure: a backend added in one place runs everywhere; recipes fail before any weight is read;
no import circle."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import secompress
from secompress.cli import main
from secompress.quant import register, unregister
from secompress.quant.backends.base import Backend, plan_export_format
from secompress.testing import make_tiny, save_tiny

ROOT = Path(__file__).resolve().parents[1]


# ---- (a) a dummy backend registered in one place -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepOptions:
    step: float = 0.25  # weights of planned Linear modules are rounded to multiples of this

    def __post_init__(self):
        if not self.step > 0:
            raise ValueError(f"step must be positive, got {self.step}")


class StepLayers:
    """The per-layer step: round the layer's planned Linear weights to the grid."""

    def __init__(self, src, plan, step):
        self.src, self.plan, self.step = src, plan, step

    def on_layer(self, index, layer, inputs):
        from secompress.quant.modules import planned_linears

        with torch.no_grad():
            for _, _, _, lin, _ in planned_linears(self.src.model, self.plan.layer(index)):
                lin.weight.copy_(torch.round(lin.weight / self.step) * self.step)


class StepBackend(Backend):
    """Rounds the planned attention/dense Linear weights to a grid; exports a plain checkpoint."""

    name = "step"
    options = StepOptions
    load_snippet = "import secompress\nmodel = secompress.load('PATH')  # step backend"

    def layer_step(self, src, plan, config):
        return StepLayers(src, plan, config.options.step)

    def save(self, model, tokenizer, plan, out, overwrite=False):
        from secompress.outputs import atomic_dir
        from secompress.quant.plan import PLAN_NAME

        with atomic_dir(out, overwrite) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / PLAN_NAME).write_text(json.dumps({**plan.to_json(), "export": {"format": "step"}}))
        return Path(out)

    def detect(self, path):
        return plan_export_format(path) == "step"

    def load(self, path, device=None):
        from secompress.checkpoints import load_model

        model = load_model(path, dtype="auto", device=device)
        model.loaded_by_step_backend = True
        return model, None

    def compatibility(self, plan):
        return {"transformers": (True, "plain weights on a grid")}


@pytest.fixture()
def step_backend():
    register(StepBackend())
    with pytest.raises(ValueError, match="registered already"):
        register(StepBackend())  # a duplicate name is an error
    yield
    unregister("step")


def _on_grid(model, step):
    w = model.model.layers[0].self_attn.q_proj.weight
    return torch.allclose(w / step, torch.round(w / step), atol=1e-4)


def test_a_backend_registered_in_one_place_runs_everywhere(step_backend, tmp_path, tokenizer, monkeypatch):
    from secompress.quant import QuantConfig, quantize_, save_quantized

    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    model = make_tiny("qwen3_moe")
    cfg = QuantConfig(method="step", bits=8, options=StepOptions(0.5), protect_super_experts=False)
    with pytest.raises(ValueError, match="takes options StepOptions"):
        QuantConfig(method="step", options=dataclasses.make_dataclass("X", [])())
    plan = quantize_(model, cfg)
    assert _on_grid(model, 0.5) and "plain weights on a grid" in plan.table()
    save_quantized(model, tokenizer, plan, tmp_path / "q")
    back = secompress.load(tmp_path / "q")
    assert getattr(back, "loaded_by_step_backend", False) and _on_grid(back, 0.5)
    src = save_tiny(make_tiny("qwen3_moe"), tmp_path / "src")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nname: step\nmodel: {{id: {src}}}\ndata: {{num_samples: 2, seq_len: 16}}\n"
                      "stages:\n  - quantize: {method: step, bits: 8, protect_super_experts: false, "
                      "options: {step: 0.25}}\n  - export: {}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "model"
    assert "# step backend" in (out / "README.md").read_text()  # its load snippet in the card
    assert _on_grid(secompress.load(out), 0.25)
    recipe.write_text(recipe.read_text().replace("step: 0.25", "step: -1"))
    assert main(["run", str(recipe), "--out", str(tmp_path / "bad")]) == 2


# ---- (b) every invalid recipe value fails before any weight is read, naming file:line: key --------
BASE = """\
version: 1
name: bad
model: {{id: {model}, model_type: {model_type}, dtype: {dtype}}}
data: {{num_samples: 2, seq_len: 16}}
stages:
  - prune: {{ratio: {ratio}, method: {prune_method}}}
  - quantize: {{method: {method}, bits: {bits}, group_size: {group_size}, se_bits: {se_bits}, calibration: {calib}}}
  - evaluate: {{sink_check: {sink_check}}}
  - export: {{}}
"""
GOODV = dict(model_type="qwen3_moe", dtype="float32", ratio=0.25, prune_method="reap", method="rtn", bits=4,
             group_size=32, se_bits=16, calib="routed", sink_check=0.5)


@pytest.mark.parametrize("change, where", [
    (dict(ratio=0.9), "r.yaml:6: stages.prune.ratio"),  # keeps fewer experts than top-k
    (dict(ratio=1.5), "r.yaml:6: stages.prune.ratio"),
    (dict(ratio=0.9, prune_method="m-smoe"), "r.yaml:6: stages.prune.ratio"),  # merges below top-k
    (dict(ratio=0.99, prune_method="heapr"), "r.yaml:6: stages.prune.ratio"),  # an expert width of 0
    (dict(prune_method="merge"), "r.yaml:6: stages.prune.method"),
    (dict(sink_check=1.5), "r.yaml:8: stages.evaluate.sink_check"),
    (dict(sink_check="high"), "r.yaml:8: stages.evaluate.sink_check"),
    (dict(method="awq"), "r.yaml:7: stages.quantize.method"),
    (dict(bits=5), "r.yaml:7: stages.quantize.bits"),
    (dict(method="bnb", bits=2), "r.yaml:7: stages.quantize.bits"),
    (dict(group_size=48), "r.yaml:7: stages.quantize.group_size"),  # does not divide the weights
    (dict(se_bits=4), "r.yaml:7: stages.quantize.se_bits"),
    (dict(calib="everything"), "r.yaml:7: stages.quantize.calibration"),
    (dict(calib="all-experts"), "r.yaml:7: stages.quantize.calibration"),  # rtn uses no calibration
    (dict(model_type="mixtral"), "r.yaml:3: model.model_type"),  # the checkpoint says qwen3_moe
    (dict(dtype="float8"), "r.yaml:3: model.dtype"),
    (dict(ratio="!!python/object/apply:os.system ['true']"), "r.yaml:6: stages.prune.ratio"),
])
def test_invalid_recipe_values_fail_before_any_weight_is_read(change, where, tiny_dir, tmp_path, monkeypatch, capsys):
    import secompress.checkpoints
    import secompress.source
    import secompress.streaming

    def no(*a, **k):
        raise AssertionError("a weight was read")

    for mod, name in ((secompress.checkpoints, "load_model"), (secompress.source.Source, "load"),
                      (secompress.streaming.Checkpoint, "get")):
        monkeypatch.setattr(mod, name, no)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.format(model=tiny_dir("qwen3_moe"), **{**GOODV, **change}))
    capsys.readouterr()  # the fixture's own output
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert where in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_the_checkpoint_check_judges_a_prune_ratio_by_its_method(tiny_dir):
    from secompress.recipe.schema import RecipeError, check_against_checkpoint, parse_recipe

    def check(**change):
        check_against_checkpoint(parse_recipe(BASE.format(model=tiny_dir("qwen3_moe"), **{**GOODV, **change}), "r.yaml"))

    check(ratio=0.9, prune_method="heapr")  # 32 -> 3 neurons per expert: fine
    with pytest.raises(RecipeError, match="r.yaml:6: stages.prune.ratio"):
        check(ratio=0.9, prune_method="hc-smoe")  # 8 -> 1 expert, below top-k 2


def test_bad_overrides_and_deep_yaml_are_one_clean_error(tiny_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE.format(model=tiny_dir("qwen3_moe"), **GOODV))
    capsys.readouterr()
    for extra in (["--override", "stages.prune.ratio=!!python/object/apply:os.system ['true']"],
                  ["--override", "stages.prune.ratio=" + "[" * 5000]):
        assert main(["run", str(recipe), "--out", str(tmp_path / "out")] + extra) == 2
        err = capsys.readouterr().err
        assert "stages.prune.ratio" in err and "Traceback" not in err
    recipe.write_text("version: 1\nname: " + "[" * 5000)
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "r.yaml: not valid YAML" in capsys.readouterr().err


# ---- (c) no import circle, function-local imports included ---------------------------------------
def _imports(path: Path, mod: str) -> set[str]:
    """The secompress modules ``path`` imports anywhere (module level, inside functions, under
    TYPE_CHECKING), resolved to module names."""
    import ast

    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("secompress")}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            if name.startswith("secompress"):
                for a in node.names:  # `from .pkg import module` imports the module
                    sub = f"{name}.{a.name}"
                    is_mod = (ROOT / (sub.replace(".", "/") + ".py")).exists() or (ROOT / sub.replace(".", "/")).is_dir()
                    out.add(sub if is_mod else name)
    return out


def _module_graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "secompress").rglob("*.py")}
    return {m: {i for i in _imports(p, m) if i in files and i != m} for m, p in files.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_even_through_function_local_imports():
    circles = _circles(_module_graph())
    assert circles == [], "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_circle_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports_alone():
    """Each secompress module is imported first, with no other secompress module loaded (one process:
    torch and transformers stay imported, secompress's modules are dropped before each import)."""
    mods = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / "secompress").rglob("*.py") if p.name != "__main__.py")
    code = ("import importlib, sys, torch, transformers\n"
            f"for m in {mods!r}:\n"
            "    for k in [k for k in sys.modules if k == 'secompress' or k.startswith('secompress.')]:\n"
            "        del sys.modules[k]\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except Exception as e:\n"
            "        print(f'{m}: {type(e).__name__}: {e}')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_a_missing_profile_is_named_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    import secompress.checkpoints

    monkeypatch.setattr(secompress.checkpoints, "load_model", lambda *a, **k: pytest.fail("loaded"))
    for cmd in (["quantize"], ["prune", "--ratio", "0.25"]):
        assert main(cmd + [str(tiny_dir("qwen3_moe")), "--profile", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")]) == 2
        assert f"--profile '{tmp_path / 'nope'}' does not exist" in capsys.readouterr().err
