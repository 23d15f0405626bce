"""Nothing left behind (issue 14): SIGTERM and Ctrl-C clean up, a killed run's temporaries are swept
by the next one, and the profile cache is safe under concurrent writers, corruption and a full disk."""
from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from secompress.cache import MANIFEST, ProfileCache
from secompress.cli import main
from secompress.outputs import sweep_stale, temp_dir
from secompress.profile import ProfileConfig, profile
from secompress.testing import make_tiny, plant_super_expert, save_tiny

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """\
version: 1
name: tiny
model: {{id: {model}, model_type: qwen3_moe}}
data: {{num_samples: 2, seq_len: 32, batch_size: 2, eval_samples: 2}}
stages:
  - profile: {{}}
  - prune: {{ratio: 0.25, method: frequency}}
  - export: {{}}
"""
# the run blocks inside its first profile write (the cache entry's temporary folder exists, and the
# run's work folder): a signal arrives mid-way, deterministically
BLOCKING_RUN = """\
import sys, time
import secompress.profile_io as p
def block(*a, **k):
    open(sys.argv[1], "w").close()
    time.sleep(120)
p.write_csv = block
from secompress.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    m = make_tiny("qwen3_moe")
    plant_super_expert(m, layer=1, expert=3)
    return save_tiny(m, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def result(tiny):
    return profile(str(tiny), config=ProfileConfig(num_samples=2, seq_len=16), progress=False)


def _hidden(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob(".*")]


def _start_blocked(ws: Path, tiny: Path) -> tuple[subprocess.Popen, Path]:
    (ws / "r.yaml").write_text(RECIPE.format(model=tiny))
    flag = ws / "flag"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SECOMPRESS_CACHE": str(ws / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_RUN, str(flag), "run", str(ws / "r.yaml"), "--out",
                             str(ws / "out" / "tiny")], env=env, cwd=ws, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run never reached its first write"
        time.sleep(0.1)
    return proc, flag


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGKILL, -9)], ids=["sigterm", "sigkill"])
def test_a_signal_mid_run_leaves_nothing_and_the_next_run_sweeps_a_kill(tmp_path, tiny, sig, code):
    proc, flag = _start_blocked(tmp_path, tiny)
    flag.unlink()
    assert _hidden(tmp_path / "out", tmp_path / "cache")  # the work folder and the cache temporary exist
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "recipe tiny: stages profile -> prune -> export" in out  # printed as it happened
    if sig == signal.SIGTERM:
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("secompress: terminated")
        assert not _hidden(tmp_path / "out", tmp_path / "cache")
        assert not (tmp_path / "out" / "tiny").exists()
        return
    left = _hidden(tmp_path / "out", tmp_path / "cache")  # a kill cannot clean up ...
    assert {p.name.split(".")[2].split("-")[0] for p in left if p.parent.name in ("out", "profiles")} == {"tmp"}
    with temp_dir(tmp_path / "out", "tiny"):  # ... the next run sweeps what the dead process left
        pass
    sweep_stale(tmp_path / "cache" / "profiles")
    assert not _hidden(tmp_path / "out", tmp_path / "cache")


def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing(tmp_path, tiny, monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("secompress.profile_io.write_csv", interrupt)
    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    assert main(["profile", str(tiny), "--out", str(tmp_path / "out"), "--samples", "2", "--seq-len", "16"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("secompress: interrupted")
    assert not (tmp_path / "out").exists() and not _hidden(tmp_path)


def test_sweep_removes_only_dead_processes_temporaries(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f".out.work-{dead.pid}-abc", f".out.tmp-{dead.pid}-x", f".out.old-{dead.pid}",
                 f".out.tmp-{os.getppid()}-live", ".notours-123", f".KEY.tmp-{dead.pid}-q"):
        (tmp_path / name).mkdir()
    removed = sweep_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".out.work-{dead.pid}-abc", f".out.tmp-{dead.pid}-x",
                                                      f".out.old-{dead.pid}", f".KEY.tmp-{dead.pid}-q"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".out.tmp-{os.getppid()}-live", ".notours-123"])


def _hammer(root: str, key: str, result, threads: int) -> list:
    """``threads`` concurrent writers and readers of one key; what each saw."""
    cache, seen = ProfileCache(root), []

    def work():
        ok = cache.put(key, result)
        got = cache.get(key)
        seen.append((ok, None if got is None else got.se_ids()))

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return seen


def test_concurrent_saves_of_one_key_all_succeed_and_read_back(tmp_path, result):
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        seen = [s for part in pool.starmap(_hammer, [(str(tmp_path), "k", result, 8)] * 4) for s in part]
    seen += _hammer(str(tmp_path), "k", result, 8)
    assert len(seen) == 40 and all(ok for ok, _ in seen)
    assert all(ses == result.se_ids() for _, ses in seen)  # every reader got the whole entry
    entries = sorted(p.name for p in (tmp_path / "profiles").iterdir())
    assert entries == ["k"]  # one entry, no temporary left
    assert ProfileCache(tmp_path).get("k").se_ids() == result.se_ids() == [(1, 3)]


@pytest.mark.parametrize("damage", ["flipped_byte", "missing_file", "no_manifest", "bad_json"])
def test_a_corrupt_cache_entry_is_detected_and_recomputed(tmp_path, result, damage, caplog):
    cache = ProfileCache(tmp_path)
    assert cache.put("k", result)
    entry = cache.path("k")
    if damage == "flipped_byte":
        data = bytearray((entry / "arrays.npz").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (entry / "arrays.npz").write_bytes(bytes(data))
    elif damage == "missing_file":
        (entry / "expert_stats.csv").unlink()
    elif damage == "no_manifest":
        (entry / MANIFEST).unlink()
    else:
        (entry / "super_experts.json").write_text("{")
        sums = json.loads((entry / MANIFEST).read_text())
        sums.pop("super_experts.json")
        (entry / MANIFEST).write_text(json.dumps(sums))  # the checksum passes, the parse fails
    with caplog.at_level(logging.WARNING, logger="secompress.cache"):
        assert cache.get("k") is None
    assert "recomputing" in caplog.text and not entry.exists()
    assert cache.put("k", result) and cache.get("k").se_ids() == result.se_ids()


def test_an_unwritable_or_full_cache_only_warns(tmp_path, result, monkeypatch, caplog):
    (tmp_path / "file").write_text("x")
    with caplog.at_level(logging.WARNING, logger="secompress.cache"):
        assert ProfileCache(tmp_path / "file").put("k", result) is False  # a file where the cache folder goes
        assert ProfileCache(tmp_path / "file").get("k") is None
    assert "continuing without it" in caplog.text

    def full(r, folder, plots=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("secompress.cache.write_profile", full)
    assert ProfileCache(tmp_path / "c").put("k", result) is False
    assert list((tmp_path / "c" / "profiles").iterdir()) == []  # its temporary went with it
