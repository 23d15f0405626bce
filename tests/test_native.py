"""secompress bounds oneDNN's per-shape kernel caches (secompress/native.py): bf16 CPU matmuls with
a new shape each time, as an MoE layer's experts make them, must not grow resident memory."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
{imp}
import torch
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
w = torch.randn(1408, 2048, dtype=torch.bfloat16)  # a Qwen1.5-MoE expert projection
x = torch.randn(400, 2048, dtype=torch.bfloat16)
torch.nn.functional.linear(x[:7], w)
a0 = anon()
for m in range(250, 400):  # 150 token counts, one per expert
    torch.nn.functional.linear(x[:m], w)
print(anon() - a0)
"""


def _growth_mib(import_secompress: bool) -> float:
    code = PROBE.format(imp="import secompress" if import_secompress else "")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_distinct_matmul_shapes_do_not_grow_memory():
    control = _growth_mib(False)
    if control < 100:
        pytest.skip(f"this torch build does not cache bf16 CPU kernels per shape here (+{control:.0f} MiB)")
    bounded = _growth_mib(True)
    assert bounded < 32, f"+{bounded:.0f} MiB over 150 matmul shapes with secompress imported (without: +{control:.0f})"


def test_user_settings_win(monkeypatch):
    from secompress.native import bound_onednn_caches

    monkeypatch.setenv("LRU_CACHE_CAPACITY", "64")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert bound_onednn_caches() == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1", "LRU_CACHE_CAPACITY": "64"}
