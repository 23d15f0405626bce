"""evaluate.backend (hf | vllm): lm-eval's arguments for an exported checkpoint, the refusals before any
compute, and a streamed recipe run that now evaluates its lm-eval tasks on the export."""
import json
from pathlib import Path

import pytest
import torch

from secompress.errors import SecompressError
from secompress.recipe import export_eval
from secompress.recipe.export_eval import LmEvalModel, check_vllm_loads, lm_eval_model, placement
from secompress.recipe.schema import EvaluateStage, RecipeError, parse_recipe
from secompress.testing import make_tiny, plant_super_expert, save_tiny

TASKS = Path(__file__).resolve().parents[1] / "evals" / "tasks"
TASK = "secompress_stdlib_nextline"


def _recipe(src, evaluate: str, quantize: str = "", export: str = "export: {}", streaming: str = "true",
            device: str = "auto") -> str:
    return f"""\
version: 1
name: tiny
model: {{id: {src}, model_type: qwen2_moe, dtype: float32, streaming: {streaming}, device: {device}}}
data: {{num_samples: 4, seq_len: 32, batch_size: 4, eval_samples: 2}}
stages:
  - profile: {{}}
{quantize}  - evaluate: {evaluate}
""" + (f"  - {export}\n" if export else "")


def test_hf_args_for_an_export():
    ev = EvaluateStage(tasks=[TASK])
    cpu = lm_eval_model("hf", Path("/o/model"), ev, "bfloat16", "cpu")
    assert cpu == LmEvalModel("hf", {"pretrained": "/o/model", "device": "cpu", "dtype": "bfloat16",
                                     "trust_remote_code": False}, 8)
    assert cpu.arg_string() == "pretrained=/o/model,device=cpu,dtype=bfloat16,trust_remote_code=False"
    # auto / cuda: accelerate spreads the export over the GPUs (lm-eval 0.4.13 keeps device_map only with parallelize)
    spread = lm_eval_model("hf", "/o/model", ev, "auto", "auto", add_bos_token=True)
    assert spread.args == {"pretrained": "/o/model", "parallelize": True, "device_map": "auto", "dtype": "auto",
                           "trust_remote_code": False, "add_bos_token": True}
    assert spread.arg_string() == ("pretrained=/o/model,parallelize=True,device_map=auto,dtype=auto,"
                                   "trust_remote_code=False,add_bos_token=True")
    assert lm_eval_model("hf", "/o/model", ev, "float16", "cuda:1").args["device"] == "cuda:1"


def test_vllm_args_for_an_export():
    ev = EvaluateStage(tasks=[TASK], backend="vllm", tensor_parallel_size=2, gpu_memory_utilization=0.8,
                       max_model_len=4096)
    lm = lm_eval_model("vllm", "/o/model", ev, "bfloat16", "auto")
    assert lm.name == "vllm" and lm.batch_size == "auto"
    assert lm.arg_string() == ("pretrained=/o/model,tensor_parallel_size=2,gpu_memory_utilization=0.8,"
                               "max_model_len=4096,dtype=bfloat16")
    short = lm_eval_model("vllm", "/src", EvaluateStage(tasks=[TASK], backend="vllm"), "float16", "auto",
                          trust_remote_code=True, add_bos_token=False, revision="r1")
    assert short.args == {"pretrained": "/src", "revision": "r1", "tensor_parallel_size": 1,
                          "gpu_memory_utilization": 0.9, "dtype": "float16", "trust_remote_code": True,
                          "add_bos_token": False}


def test_lm_eval_0413_takes_these_argument_names():
    """The names built above are lm-eval 0.4.13's own constructor arguments (VLLM passes
    gpu_memory_utilization on to vllm.LLM through **kwargs)."""
    import inspect

    from lm_eval.models.huggingface import HFLM

    hf = inspect.signature(HFLM.__init__).parameters
    assert {"pretrained", "device", "dtype", "trust_remote_code", "parallelize", "add_bos_token"} <= set(hf)
    src = Path(inspect.getfile(HFLM)).with_name("vllm_causallms.py").read_text()
    for name in ("tensor_parallel_size: int", "max_model_len: int", "dtype: Literal", "self.model_args.update(kwargs)"):
        assert name in src


def test_placement(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement("auto") == "cpu" and placement("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert placement("auto") == "auto" and placement("cuda") == "auto" and placement("cuda:1") == "cuda:1"


def test_schema_keys_and_their_errors(tmp_path):
    ok = parse_recipe(_recipe(tmp_path, f"{{tasks: [{TASK}], backend: vllm, tensor_parallel_size: 2, "
                                        "gpu_memory_utilization: 0.85, max_model_len: 2048}"), "r.yaml")
    ev = ok.stage("evaluate")
    assert (ev.backend, ev.tensor_parallel_size, ev.gpu_memory_utilization, ev.max_model_len) == ("vllm", 2, 0.85, 2048)
    assert parse_recipe(_recipe(tmp_path, f"{{tasks: [{TASK}]}}"), "r.yaml").stage("evaluate").backend == "hf"
    bad = {"backend: tgi": "r.yaml:7: stages.evaluate.backend: backend must be one of hf, vllm",
           "backend: vllm, gpu_memory_utilization: 1.5": "stages.evaluate.gpu_memory_utilization: .* in \\(0, 1\\]",
           "tensor_parallel_size: 2": "stages.evaluate.tensor_parallel_size: tensor_parallel_size sizes the vllm",
           "backend: vllm, max_model_len: 0": "stages.evaluate.max_model_len: max_model_len must be >= 1"}
    for keys, msg in bad.items():
        with pytest.raises(RecipeError, match=msg):
            parse_recipe(_recipe(tmp_path, f"{{tasks: [{TASK}], {keys}}}"), "r.yaml")
    with pytest.raises(RecipeError, match="backend 'vllm' runs the lm-eval tasks, and tasks is empty"):
        parse_recipe(_recipe(tmp_path, "{backend: vllm}"), "r.yaml")


def _no_compute(monkeypatch):
    """Any weight read or profile fails the test: the refusals must come first."""
    import secompress.recipe.run as run
    from secompress.source import Source

    def boom(*a, **k):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(Source, "load", boom)
    monkeypatch.setattr(run, "_cached_profile", boom)


def test_vllm_refusals_before_any_compute(tmp_path, monkeypatch):
    from secompress.quant.backends import base
    from secompress.recipe.run import run_recipe

    _no_compute(monkeypatch)
    src = save_tiny(make_tiny("qwen2_moe", num_hidden_layers=2), tmp_path / "tiny")
    ev = f"{{tasks: [{TASK}], task_paths: [{TASKS}], backend: vllm}}"
    for streaming in ("true", "false"):
        text = _recipe(src, ev, streaming=streaming)
        monkeypatch.setattr(base, "installed", lambda p: p != "vllm")
        with pytest.raises(RecipeError, match=r"r.yaml:7: stages.evaluate.backend: vllm needs vLLM, which is not "
                                              r"installed: pip install vllm"):
            run_recipe(parse_recipe(text, "r.yaml"), text, tmp_path / "out", progress=False)
        monkeypatch.setattr(base, "installed", lambda p: True)  # as if vLLM were there
        with pytest.raises(RecipeError, match="vllm needs a CUDA GPU, and the device is the CPU"):
            run_recipe(parse_recipe(_recipe(src, ev, streaming=streaming, device="cpu"), "r.yaml"), text,
                       tmp_path / "out", progress=False)
        if not torch.cuda.is_available():  # auto on this machine: the CPU
            with pytest.raises(RecipeError, match="the device is the CPU"):
                run_recipe(parse_recipe(text, "r.yaml"), text, tmp_path / "out", progress=False)
        import secompress.devices as devices

        monkeypatch.setattr(devices, "resolve_device", lambda spec: torch.device("cuda", 0))  # as if a GPU were there
        no_export = _recipe(src, ev, streaming=streaming, export="")
        with pytest.raises(RecipeError, match="vllm evaluates the exported checkpoint: add an export stage"):
            run_recipe(parse_recipe(no_export, "r.yaml"), no_export, tmp_path / "out", progress=False)
        monkeypatch.undo()
        _no_compute(monkeypatch)
    assert not (tmp_path / "out").exists()


def test_vllm_refused_for_an_export_vllm_cannot_load(tmp_path):
    """The compatibility report of the streamed plan (known before the first pass) decides: asymmetric int8
    compressed-tensors codes are refused (no vLLM MoE kernel takes them), symmetric ones pass; a dequantized
    export passes (its writer always writes the index that keeps vLLM off the codes file); a plain checkpoint has
    no report."""
    from secompress.compress import Job
    from secompress.quant.config import QuantConfig
    from test_streamed import streamed

    src = save_tiny(make_tiny("qwen2_moe", num_hidden_layers=2), tmp_path / "tiny")
    recipe = parse_recipe(_recipe(src, f"{{tasks: [{TASK}], backend: vllm}}"), "r.yaml")
    asym, _ = streamed(src, Job(quant=QuantConfig(bits=8, group_size=16, symmetric=False,
                                                  protect_super_experts=False)))
    with pytest.raises(RecipeError, match=r"r.yaml:7: stages.evaluate.backend: vllm cannot load this export, says "
                                          r"its compatibility report: asymmetric int8 experts"):
        check_vllm_loads(recipe, asym.report())
    sym, _ = streamed(src, Job(quant=QuantConfig(bits=4, group_size=16, symmetric=True, protect_super_experts=False)))
    check_vllm_loads(recipe, sym.report())
    check_vllm_loads(recipe, streamed(src, Job())[0].report())  # no quantization: no report
    deq, _ = streamed(src, Job(quant=QuantConfig(bits=4, group_size=16, protect_super_experts=False,
                                                format="dequantized")))
    check_vllm_loads(recipe, deq.report())  # its writer indexes the model shards: vLLM skips the codes file
    assert "the index names the model shards only" in deq.quant_plan.compatibility()["vllm-fused-moe"][1]


@pytest.mark.parametrize("fmt", ["dequantized", "compressed-tensors"])
def test_streamed_run_evaluates_tasks_on_the_export(tmp_path, monkeypatch, fmt):
    from secompress.recipe.run import run_recipe

    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    m = make_tiny("qwen2_moe", num_hidden_layers=3)
    plant_super_expert(m, layer=1, expert=3)
    src = save_tiny(m, tmp_path / "tiny")
    quant = "  - quantize: {method: rtn, bits: 4, group_size: 16, se_mode: layer, symmetric: true}\n"
    text = _recipe(src, f"{{perplexity: true, tasks: [{TASK}], task_paths: [{TASKS}], limit: 4}}", quant,
                   f"export: {{format: {fmt}}}")
    res = run_recipe(parse_recipe(text, "r.yaml"), text, tmp_path / "out", progress=False)
    assert res.manifest["mode"] == "streamed"
    row = res.comparison.rows[f"{TASK}/acc"]
    assert 0.0 <= row["se_aware"] <= 1.0 and row["baseline"] is None and row["recovery_se_aware"] is None
    assert res.comparison.rows["perplexity"]["baseline"] > 0  # the pass's own rows are unchanged
    notes = " ".join(res.manifest["notes"])
    assert "skipped" not in notes and "not measured in a streamed run" in notes
    if fmt == "dequantized":  # stock transformers loads it: lm-eval's HFLM reads the folder itself
        assert "HFLM loading the folder (pretrained=" in notes and "device=cpu,dtype=float32" in notes
    else:  # the 16-bit Super-Expert layer sits in `ignore`: transformers cannot, secompress.load can
        report = json.loads((tmp_path / "out" / "model" / "quantization_plan.json").read_text())["compatibility"]
        assert report["transformers"]["ok"] is False and "MoE layers [1] in `ignore`" in report["transformers"]["why"]
        assert "secompress.load on cpu, the model handed to lm-eval HFLM" in notes
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert saved[f"{TASK}/acc"]["se_aware"] == row["se_aware"]
    assert f"{TASK}/acc" in (tmp_path / "out" / "model" / "README.md").read_text()


def test_comparison_add_keeps_missing_columns_empty():
    from secompress.recipe.evaluation import Comparison

    c = Comparison.build({"perplexity": 10.0}, {"perplexity": 12.0}, None)
    c.add({"t/acc": 0.5, "t/bits_per_byte": 2.0}, {"t/bits_per_byte": 1.0})
    assert c.rows["t/acc"] == {"baseline": None, "se_aware": 0.5, "se_unaware": None, "recovery_se_aware": None,
                               "recovery_se_unaware": None}
    assert c.rows["t/bits_per_byte"]["recovery_se_aware"] == 0.5  # lower is better
    assert "| t/acc | n/a | 0.5 | n/a | n/a | n/a |" in c.markdown()
    with pytest.raises(SecompressError, match="t/bits_per_byte recovers 0.500"):
        c.check(0.9)


def test_in_memory_run_with_vllm_evaluates_the_source_and_the_export(tmp_path, monkeypatch, planted_qwen2_moe):
    """The wiring of an in-memory run with backend vllm (vLLM itself is not installed here: lm-eval's
    simple_evaluate is replaced by a recorder): no in-memory lm-eval, then vLLM arguments for the source
    (baseline) and the written export (SE-aware), their rows in comparison.json and the model card."""
    import secompress.recipe.evaluation as evaluation
    import secompress.recipe.run as run

    src = planted_qwen2_moe
    quant = "  - quantize: {method: rtn, bits: 4, group_size: 16, se_mode: layer, symmetric: true}\n"
    text = _recipe(src, f"{{tasks: [{TASK}], task_paths: [{TASKS}], backend: vllm, max_model_len: 64, compare_se_unaware: false}}",
                   quant, streaming="false")
    calls = []

    def recorder(lm, stage, label):
        calls.append((lm, label))
        assert Path(lm.args["pretrained"], "config.json").is_file()  # the export is written before it is evaluated
        return {f"{TASK}/acc": 0.5 if label == "baseline" else 0.4}

    monkeypatch.setattr(run, "check_backend", lambda recipe: None)  # vLLM and a GPU: not on this machine
    monkeypatch.setattr(export_eval, "run_tasks", recorder)
    monkeypatch.setattr(evaluation, "_lm_eval", lambda *a: pytest.fail("in-memory lm-eval with backend vllm"))
    res = run.run_recipe(parse_recipe(text, "r.yaml"), text, tmp_path / "out", progress=False)
    (base, l0), (aware, l1) = calls
    assert (l0, l1) == ("baseline", "SE-aware") and base.name == aware.name == "vllm"
    assert base.args == {"pretrained": str(src), "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9,
                         "max_model_len": 64, "dtype": "float32", "add_bos_token": True}
    assert Path(aware.args["pretrained"]).name == "model" and aware.args["max_model_len"] == 64
    row = json.loads((tmp_path / "out" / "comparison.json").read_text())[f"{TASK}/acc"]
    assert row["baseline"] == 0.5 and row["se_aware"] == 0.4 and row["recovery_se_aware"] == pytest.approx(0.8)
    assert row["se_unaware"] is None
    assert f"{TASK}/acc" in (tmp_path / "out" / "model" / "README.md").read_text()
    assert any("via vLLM" in n for n in res.manifest["notes"])
