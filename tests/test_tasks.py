"""The offline lm-eval tasks under evals/tasks run through lm_eval.simple_evaluate."""
import json
import math
from pathlib import Path

TASKS = Path(__file__).resolve().parents[1] / "evals" / "tasks"


def test_task_data_is_well_formed():
    mc = [json.loads(l) for l in (TASKS / "stdlib_nextline.jsonl").read_text().splitlines()]
    assert len(mc) == 200
    for it in mc:
        assert len(it["choices"]) == 4 and 0 <= it["label"] < 4 and len(set(it["choices"])) == 4
    docs = [json.loads(l) for l in (TASKS / "stdlib_heldout.jsonl").read_text().splitlines()]
    assert docs and all(d["text"] for d in docs)
    calibration = {"contextlib.py", "_strptime.py", "multiprocessing/heap.py", "sunau.py"}
    assert not calibration & {d["path"] for d in docs} and not calibration & {d["path"] for d in mc}


def test_tasks_run_with_lm_eval_offline(tiny_dir, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_dir('qwen3_moe')},dtype=float32,add_bos_token=True",
        tasks=["secompress_stdlib_ppl", "secompress_stdlib_nextline"], task_manager=TaskManager(include_path=str(TASKS)),
        limit=3, batch_size=4, device="cpu", log_samples=False)
    ppl = out["results"]["secompress_stdlib_ppl"]
    mc = out["results"]["secompress_stdlib_nextline"]
    assert math.isfinite(ppl["bits_per_byte,none"]) and ppl["bits_per_byte,none"] > 0
    assert 0.0 <= mc["acc,none"] <= 1.0
