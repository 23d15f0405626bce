"""lm-eval tasks on the EXPORTED checkpoint folder: ``evaluate.backend: hf | vllm``.

:func:`lm_eval_model` builds lm-eval's model name and ``model_args`` for an export (pure; what the
manifest records). hf: lm-eval's ``HFLM`` loads the folder, spread over the GPUs by accelerate
(``parallelize=True,device_map=auto``: lm-eval 0.4.13 drops a ``device_map`` given without
``parallelize``) when the device is ``auto``/``cuda`` and a GPU is there, else on the one device; an
export stock transformers cannot load (its compatibility report says no, e.g. a compressed-tensors
export with a 16-bit Super-Expert layer in ``ignore``) is loaded with ``secompress.load`` and the
model handed to ``HFLM``. vllm: lm-eval's ``VLLM`` with ``tensor_parallel_size``,
``gpu_memory_utilization``, ``max_model_len``.

:func:`check_backend` refuses, before any compute, what cannot work (vLLM not installed, a CPU device,
no export stage); :func:`check_vllm_loads` refuses an export whose compatibility report says vLLM
cannot load it, as soon as that report exists (the streamed plan; the in-memory run right after
compression, before evaluation and export).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import require

log = logging.getLogger(__name__)
VLLM_RUNTIMES = ("vllm", "vllm-fused-moe")  # what the exporters' compatibility reports call vLLM
HF_BATCH_SIZE = 8  # as the in-memory evaluation's HFLM


@dataclass(frozen=True)
class LmEvalModel:
    """lm-eval's model name (``hf`` | ``vllm``), its ``model_args`` and the batch size for simple_evaluate."""

    name: str
    args: dict = field(default_factory=dict)
    batch_size: int | str = HF_BATCH_SIZE

    def __post_init__(self):
        if self.name not in ("hf", "vllm"):
            raise ValueError(f"name must be hf or vllm, got {self.name!r}")
        if not self.args.get("pretrained"):
            raise ValueError("args must name the checkpoint folder (pretrained)")

    def arg_string(self) -> str:
        """The ``--model_args`` spelling, as ``lm_eval --model NAME --model_args ...`` takes it."""
        return ",".join(f"{k}={v}" for k, v in self.args.items())


def placement(spec: str) -> str:
    """``cpu``, ``auto`` (spread over every visible GPU) or ``cuda:N`` for the recipe's ``model.device``."""
    spec = spec.strip().lower()
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "auto" if spec in ("auto", "cuda") else spec


def lm_eval_model(backend: str, pretrained: str | Path, stage, dtype: str, device: str,
                  trust_remote_code: bool = False, add_bos_token: bool | None = None,
                  revision: str | None = None) -> LmEvalModel:
    """lm-eval's model and arguments for the checkpoint folder (or hub id) ``pretrained``.

    ``stage``: the recipe's EvaluateStage; ``dtype``: a name lm-eval and vLLM take (auto, float32,
    bfloat16, float16); ``device``: :func:`placement`'s answer (hf only: vLLM places itself);
    ``add_bos_token``: as the in-memory evaluation sets it (None: the tokenizer's own default)."""
    args: dict = {"pretrained": str(pretrained)}
    if revision is not None:
        args["revision"] = revision
    if backend == "hf":
        if device == "auto":
            args.update(parallelize=True, device_map="auto")
        else:
            args["device"] = device
        args.update(dtype=dtype, trust_remote_code=trust_remote_code)
        batch: int | str = HF_BATCH_SIZE
    elif backend == "vllm":
        args.update(tensor_parallel_size=stage.tensor_parallel_size,
                    gpu_memory_utilization=stage.gpu_memory_utilization)
        if stage.max_model_len is not None:
            args["max_model_len"] = stage.max_model_len
        args["dtype"] = dtype
        if trust_remote_code:
            args["trust_remote_code"] = True
        batch = "auto"
    else:
        raise ValueError(f"backend must be hf or vllm, got {backend!r}")
    if add_bos_token is not None:
        args["add_bos_token"] = add_bos_token
    return LmEvalModel(backend, args, batch)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- refusals --------------------------------------------------------------------------------
def check_backend(recipe) -> None:
    """Before any compute: a RecipeError (``file:line: key``) for a vllm backend that cannot run."""
    from ..devices import resolve_device
    from ..quant.backends.base import installed
    from .schema import RecipeError

    ev = recipe.stage("evaluate")
    if ev is None or ev.backend != "vllm":
        return
    at = recipe.at("stages.evaluate.backend")
    if not installed("vllm"):
        raise RecipeError(f"{at}: vllm needs vLLM, which is not installed: pip install vllm "
                          "(or set evaluate.backend: hf)")
    if resolve_device(recipe.model.device).type == "cpu":
        raise RecipeError(f"{at}: vllm needs a CUDA GPU, and the device is the CPU "
                          f"(model.device: {recipe.model.device}): set evaluate.backend: hf, or run on a GPU")
    if recipe.stage("export") is None:
        raise RecipeError(f"{at}: vllm evaluates the exported checkpoint: add an export stage")


def runtime(report: dict, name: str) -> tuple[bool, str] | None:
    """(loads, why) of runtime ``name`` (``transformers`` | ``vllm``) in a compatibility report, None
    when the report does not say (a plain, unquantized checkpoint has none)."""
    keys = VLLM_RUNTIMES if name == "vllm" else (name,)
    for k in keys:
        if k in report:
            v = report[k]
            return (bool(v["ok"]), v["why"]) if isinstance(v, dict) else (bool(v[0]), v[1])
    return None


def export_report(folder: Path) -> dict:
    """The compatibility report in ``folder``'s quantization_plan.json ({} without one: not quantized)."""
    from ..quant.plan import PLAN_NAME

    f = Path(folder) / PLAN_NAME
    if not f.is_file():
        return {}
    d = json.loads(f.read_text())
    return d.get("compatibility") or d.get("export", {}).get("compatibility", {})


def check_vllm_loads(recipe, report: dict) -> None:
    """A RecipeError when backend is vllm and ``report`` says vLLM cannot load the export."""
    from .schema import RecipeError

    ev = recipe.stage("evaluate")
    if ev is None or ev.backend != "vllm":
        return
    said = runtime(report, "vllm")
    if said is not None and not said[0]:
        raise RecipeError(f"{recipe.at('stages.evaluate.backend')}: vllm cannot load this export, says its "
                          f"compatibility report: {said[1]}; change the quantize stage, or set evaluate.backend: hf")


# ---- running ---------------------------------------------------------------------------------
def run_tasks(lm: LmEvalModel, stage, label: str) -> dict[str, float]:
    """The recipe's lm-eval tasks with lm-eval building the model from ``lm``; ``{task/metric: value}``."""
    lm_eval = require("lm_eval", "eval", "The evaluate stage's lm-eval tasks")
    from .evaluation import _labelled_lm_eval, task_manager, task_rows

    with _labelled_lm_eval(label):
        tm = task_manager(stage)
        res = lm_eval.simple_evaluate(model=lm.name, model_args=dict(lm.args), tasks=list(stage.tasks),
                                      task_manager=tm, limit=stage.limit, batch_size=lm.batch_size,
                                      log_samples=False, bootstrap_iters=0)
    return task_rows(res)


@dataclass
class ExportTasks:
    """What :func:`evaluate_export` measured and how (for the log and the manifest)."""

    rows: dict[str, float]
    how: str
    model_args: str | None = None  # lm-eval's model_args when lm-eval loaded the folder itself


def evaluate_export(recipe, folder: Path, tokenizer, dtype: torch.dtype, label: str = "SE-aware") -> ExportTasks:
    """Run the recipe's lm-eval tasks on the exported checkpoint ``folder`` with ``evaluate.backend``."""
    ev = recipe.stage("evaluate")
    m = recipe.model
    bos = getattr(tokenizer, "bos_token_id", None) is not None
    report = export_report(folder)
    if ev.backend == "vllm":
        check_vllm_loads(recipe, report)
        lm = lm_eval_model("vllm", folder, ev, dtype_name(dtype), "auto", m.trust_remote_code, bos)
        how = f"vLLM (lm-eval VLLM, {lm.arg_string()})"
        log.info("lm-eval tasks %s on the export: %s", ev.tasks, how)
        return ExportTasks(run_tasks(lm, ev, label), how, lm.arg_string())
    tf = runtime(report, "transformers")
    if tf is None or tf[0]:
        lm = lm_eval_model("hf", folder, ev, dtype_name(dtype), placement(m.device), m.trust_remote_code, bos)
        why = "an unquantized checkpoint" if tf is None else f"the compatibility report: {tf[1]}"
        how = f"lm-eval HFLM loading the folder ({lm.arg_string()}): stock transformers loads it ({why})"
        log.info("lm-eval tasks %s on the export: %s", ev.tasks, how)
        return ExportTasks(run_tasks(lm, ev, label), how, lm.arg_string())
    from .. import load
    from ..devices import resolve_device
    from .evaluation import _lm_eval

    device = resolve_device(m.device)
    how = (f"secompress.load on {device}, the model handed to lm-eval HFLM: stock transformers cannot load this "
           f"export (the compatibility report: {tf[1]})")
    log.info("lm-eval tasks %s on the export: %s", ev.tasks, how)
    model = load(folder, device=None if device.type == "cpu" else str(device), trust_remote_code=m.trust_remote_code)
    return ExportTasks(_lm_eval(model, tokenizer, ev, label), how)


def evaluate_source(recipe, dtype: torch.dtype, tokenizer, label: str = "baseline") -> dict[str, float]:
    """The recipe's lm-eval tasks on the source checkpoint with the vllm backend (the baseline column of a
    run that evaluates its export with vLLM, measured the same way)."""
    ev, m = recipe.stage("evaluate"), recipe.model
    bos = getattr(tokenizer, "bos_token_id", None) is not None
    lm = lm_eval_model("vllm", m.id, ev, dtype_name(dtype), "auto", m.trust_remote_code, bos, m.revision)
    log.info("lm-eval tasks %s on the source checkpoint: vLLM (%s)", ev.tasks, lm.arg_string())
    return run_tasks(lm, ev, label)


STREAMED_BASELINE_NOTE = ("baseline and SE-unaware lm-eval numbers are not measured in a streamed run (each needs "
                          "more passes over the source checkpoint): the comparison reads n/a for them; run the same "
                          "tasks on the source checkpoint to compare")


def streamed_tasks(recipe, folder: Path | None, tokenizer, dtype: torch.dtype, comparison, notes: list) -> None:
    """A streamed run's lm-eval tasks, on its export ``folder`` once written: SE-aware rows added to
    ``comparison``; ``notes`` (the manifest's) say how, and what was not measured."""
    ev = recipe.stage("evaluate")
    if ev is None or not ev.tasks:
        return
    if folder is None:
        notes.append(f"lm-eval tasks {ev.tasks} skipped: a streamed run evaluates them on its export, and the "
                     "recipe has no export stage")
        log.warning(notes[-1])
        return
    res = evaluate_export(recipe, folder, tokenizer, dtype)
    comparison.add(res.rows)
    notes.append(f"lm-eval tasks {ev.tasks} ran on the export via {res.how}")
    notes.append(STREAMED_BASELINE_NOTE)
    log.info(notes[-1])


def in_memory_vllm_tasks(recipe, model, tokenizer, folder: Path, comparison) -> list[str]:
    """An in-memory run with ``evaluate.backend: vllm``: once the export is written, the compressed model
    leaves the GPU, vLLM evaluates the source checkpoint (baseline) and the export (SE-aware), the rows
    join ``comparison`` and the recovery threshold is checked; returns the manifest's notes."""
    ev = recipe.stage("evaluate")
    dtype = model.get_input_embeddings().weight.dtype
    if any(p.is_cuda for p in model.parameters()):
        model.to("cpu")  # vLLM takes gpu_memory_utilization of each GPU for itself
        torch.cuda.empty_cache()
    base = evaluate_source(recipe, dtype, tokenizer)
    res = evaluate_export(recipe, folder, tokenizer, dtype)
    comparison.add(res.rows, base)
    comparison.check(ev.recovery_threshold)
    return [f"lm-eval tasks {ev.tasks}: baseline on the source checkpoint and SE-aware on the export, both via "
            f"{res.how}; SE-unaware n/a (that variant is never exported)"]
