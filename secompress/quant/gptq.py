"""GPTQ through gptqmodel (the maintained successor of auto-gptq), driven by a secompress plan.

GPTQ (Frantar et al. 2023) quantizes each weight column by column, compensating the error
with the inverse Hessian of its calibration inputs. gptqmodel runs the algorithm, defuses
transformers-5 fused experts into per-expert Linear modules, and takes per-module overrides
in its ``dynamic`` config: ``"-:REGEX"`` skips matching modules (they stay 16-bit) and
``"+:REGEX": {"bits": b}`` changes their bits. :func:`dynamic_from_plan` turns a
:class:`~secompress.quant.plan.QuantPlan` into those overrides, so Super Experts are skipped
or kept at 8 bit exactly as the plan says.

Loading the result: mixed-precision ``dynamic`` checkpoints load with ``GPTQModel.load`` (and
vLLM); plain ``AutoModelForCausalLM`` needs the fused experts defused first.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..errors import SecompressError
from ..checkpoints import load_config, write_legacy_config_keys
from ..outputs import atomic_dir
from ..adapters import get_adapter
from .plan import QuantPlan

log = logging.getLogger(__name__)
GPTQ_BITS = (2, 3, 4, 8)


def _module_regex(unit_name: str, is_expert: bool) -> str:
    # gptqmodel matches against module names; an expert unit covers its three projections
    body = re.escape(unit_name)
    return rf".*{body}\..*" if is_expert else rf".*{body}$"


def dynamic_from_plan(plan: QuantPlan, default_bits: int) -> dict[str, dict]:
    """gptqmodel ``dynamic`` overrides for every unit whose bits differ from ``default_bits``."""
    dyn: dict[str, dict] = {}
    for name, bits in plan.bits.items():
        if bits == default_bits:
            continue
        rx = _module_regex(name, plan.units[name].expert is not None)
        if bits is None:
            dyn[f"-:{rx}"] = {}
        else:
            if bits not in GPTQ_BITS:
                raise ValueError(f"GPTQ quantizes to {GPTQ_BITS} bits; '{name}' is planned at {bits}")
            dyn[f"+:{rx}"] = {"bits": bits}
    return dyn


def gptq_quantize(model_path: str | Path, tokenizer, plan: QuantPlan, calib_ids: torch.Tensor, out: str | Path,
                  bits: int = 4, group_size: int | None = 128, symmetric: bool = True, overwrite: bool = False,
                  se_aware: bool = True, batch_size: int = 4, fallback: str | None = None,
                  all_experts: bool = False) -> dict:
    """Quantize the checkpoint at ``model_path`` with GPTQ following ``plan`` and save it to ``out``.

    ``calib_ids`` [N, S] are the calibration windows. With ``se_aware=False`` the plan's
    overrides are ignored (plain gptqmodel, the baseline of the wall-time comparison).
    ``fallback``: None turns off gptqmodel's default low-sample fallback (RTN for any module
    that sees under 0.5% of the calibration tokens, which in a MoE silently catches rare
    experts), so every quantized weight is GPTQ; "rtn" keeps it. Callers check coverage
    first (:func:`~secompress.quant.coverage.check_coverage`): an expert with no token at
    all is an error unless the fallback is chosen. ``all_experts``: gptqmodel forwards every
    calibration token through every expert (its ``ExpertsRoutingBypass``, the scheme of
    :func:`~secompress.quant.coverage.all_expert_calibration`), so no expert lacks statistics.
    gptqmodel patches transformers' MoE classes when it is imported (it defuses experts), so
    it runs in a child process and this process's transformers stays untouched.
    Returns the child's timings and the overrides used.
    """
    from .backends import get_backend

    from ..checkpoints import local_checkpoint
    from ..integrity import verify

    get_backend("gptq").require()  # MissingExtraError naming the extra, without importing gptqmodel here
    adapter = get_adapter(load_config(model_path))
    verify(local_checkpoint(model_path))  # only .safetensors, every tensor there, before gptqmodel reads it
    dynamic = dynamic_from_plan(plan, bits) if se_aware else {}
    with atomic_dir(out, overwrite) as tmp:
        local = Path(model_path)
        job = {"mode": "quantize", "model": str(local.resolve()) if local.exists() else str(model_path),
               "bits": bits, "group_size": group_size or -1, "sym": symmetric, "dynamic": dynamic,
               "batch_size": batch_size, "out": str((tmp / "model").resolve()), "fallback": fallback,
               "all_experts": all_experts}
        work = tmp / ".job"
        work.mkdir()
        torch.save(calib_ids.cpu(), work / "calib.pt")
        _run_child(work, job)
        timings = json.loads((work / "timings.json").read_text())
        probe = torch.load(work / "logits.pt", weights_only=True)
        shutil.rmtree(work)
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_legacy_config_keys(tmp / "config.json", load_config(model_path), adapter)
        (tmp / "quantization_plan.json").write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    return {**timings, "dynamic": dynamic, "probe_logits": probe}


@torch.no_grad()
def gptq_(model, tokenizer, plan: QuantPlan, config, profile, calib, work: str | Path,
          source: str | Path | None = None) -> Path:
    """GPTQ for an in-memory model following ``plan`` (the ``gptq`` backend's ``apply``).

    gptqmodel quantizes ``source`` (the local checkpoint the model was loaded from, unchanged
    since) or else ``model`` saved to ``work/src``, into ``work/gptq``, on the windows of
    ``calib`` (a :class:`~secompress.data.CalibrationData`, or text tokenized now); ``config`` is
    the :class:`~secompress.quant.config.QuantConfig`. The GPTQ codes are then loaded back into
    ``model`` as integer-coded modules (:mod:`.gptq_codes`), so it can be evaluated here.
    ``profile`` gives the coverage: an expert no calibration token reached is an error unless
    the fallback is 'rtn' or the calibration is 'all-experts'. Returns the GPTQ folder.
    """
    from ..checkpoints import check_model
    from ..data import CalibrationData, load_calibration
    from ..profile import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN
    from ..streaming import Checkpoint, materialise_model, release
    from .coverage import check_coverage
    from .gptq_codes import load_gptq_codes

    work = Path(work)
    all_experts = config.calibration == "all-experts"
    if not all_experts:
        check_coverage(profile, config.fallback)  # an expert without tokens: error unless fallback 'rtn'
    if not isinstance(calib, CalibrationData):
        calib = load_calibration(calib, tokenizer, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN)
    adapter = check_model(model)
    src = Path(source) if source is not None and Path(source).is_dir() else None
    if src is None:
        src = work / "src"
        model.save_pretrained(src)
        tokenizer.save_pretrained(src)
        write_legacy_config_keys(src / "config.json", model.config, adapter)
    dtype = model.get_input_embeddings().weight.dtype
    release(model)  # the weights go back to meta while gptqmodel holds its own copy
    try:
        gptq_quantize(src, tokenizer, plan, calib.input_ids, work / "gptq", bits=config.bits,
                      group_size=config.group_size, symmetric=config.symmetric, fallback=config.fallback,
                      batch_size=config.options.batch_size, all_experts=all_experts)
    finally:
        materialise_model(model, Checkpoint(src), adapter, dtype)
    if src == work / "src":
        shutil.rmtree(src)
    load_gptq_codes(model, plan, work / "gptq")
    return work / "gptq"


def _run_child(work: Path, job: dict) -> None:
    (work / "job.json").write_text(json.dumps(job))
    env = dict(os.environ)
    env.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its default worker pool fails on 2-core machines
    res = subprocess.run([sys.executable, "-m", "secompress.quant.gptq", str(work.resolve())], capture_output=True,
                         text=True, env=env, cwd=work)  # gptqmodel writes a logs/ folder into its cwd
    if res.returncode != 0:
        raise SecompressError(f"gptqmodel failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}")


def reload_logits(path: str | Path, probe_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a saved GPTQ checkpoint reloaded with ``GPTQModel.load`` (in a child process)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        torch.save(probe_ids.cpu(), work / "calib.pt")
        _run_child(work, {"mode": "reload", "model": str(Path(path).resolve())})
        return torch.load(work / "logits.pt", weights_only=True)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.model(input_ids=ids.to(next(model.model.parameters()).device)).logits.float().cpu()


def _child(work: Path) -> None:
    """Runs in the child process: quantize + save (logits of the quantized model on the first
    calibration windows kept for the round-trip check), or reload + logits."""
    from gptqmodel import GPTQModel, QuantizeConfig

    job = json.loads((work / "job.json").read_text())
    ids = torch.load(work / "calib.pt", weights_only=True)  # [N, S]
    probe = ids[:2]
    if job["mode"] == "reload":  # logits of every window given
        model = GPTQModel.load(job["model"])
        torch.save(torch.cat([_logits(model, chunk) for chunk in ids.split(4)]), work / "logits.pt")
        return
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    fallback = {"strategy": "rtn", "threshold": "0.5%"} if job.get("fallback") == "rtn" else None
    moe = None
    if job.get("all_experts"):  # every calibration token through every expert
        from gptqmodel.quantization.config import ExpertsRoutingBypass, MoEConfig

        moe = MoEConfig(routing=ExpertsRoutingBypass())
    qcfg = QuantizeConfig(bits=job["bits"], group_size=job["group_size"], sym=job["sym"],
                          dynamic=job["dynamic"] or None, fallback=fallback, moe=moe)
    t0 = time.perf_counter()
    model = GPTQModel.load(job["model"], qcfg)
    t1 = time.perf_counter()
    model.quantize(calib, batch_size=job["batch_size"])
    t2 = time.perf_counter()
    model.save(job["out"])
    (work / "timings.json").write_text(json.dumps({"load_s": t1 - t0, "quantize_s": t2 - t1}))
    torch.save(_logits(GPTQModel.load(job["out"]), probe), work / "logits.pt")


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
