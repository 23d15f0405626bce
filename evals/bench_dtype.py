"""Peak memory of `profile` and `prune` on a bfloat16 checkpoint with each tree's default dtype (not a test).

    python evals/bench_dtype.py [--before-rev main] [--out bench_dtype.json]

Writes a synthetic bfloat16 Qwen3-MoE checkpoint (safetensors, ~240 MB: 6 layers x 32 experts,
hidden 512, expert FFN 384), then runs the CLI commands below in a fresh child process each,
once with the code of ``--before-rev`` (extracted with ``git archive``) and once with this
tree, and prints every child's peak resident memory (ru_maxrss) as MiB and as a multiple of
the checkpoint's size (also above the floor: a child that only imports python, torch,
transformers and secompress), plus the size and dtype of what `prune` wrote. No --dtype is passed: each
tree's default is what is measured (float32 before issue 15, "auto" = the checkpoint's own after).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = dict(hidden_size=512, moe_intermediate_size=384, num_experts=32, num_experts_per_tok=4,
            num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=64)
DATA = ["--samples", "8", "--seq-len", "128", "--batch-size", "4"]
COMMANDS = {
    "profile": ["profile", "{model}", "--out", "{out}", "--no-plots", *DATA],
    "profile --streaming": ["profile", "{model}", "--out", "{out}", "--no-plots", "--streaming", *DATA],
    "prune 25%": ["prune", "{model}", "--ratio", "0.25", "--out", "{out}", "--samples", "8", "--eval-samples", "2",
                  "--seq-len", "128", "--batch-size", "4"],
}
FLOOR = ("import resource, torch, transformers, secompress.cli\n"
         "from transformers.models.qwen3_moe import modeling_qwen3_moe\n"
         "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'RC', 0)\n")
CHILD = ("import resource, runpy, sys, json\n"
         "sys.argv = ['secompress'] + json.loads(sys.argv[1])\n"
         "code = 0\n"
         "try:\n    runpy.run_module('secompress.cli', run_name='__main__')\n"
         "except SystemExit as e:\n    code = e.code or 0\n"
         "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'RC', code)\n")


def make_checkpoint(path: Path) -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    from secompress.testing import make_tiny, save_tiny

    save_tiny(make_tiny("qwen3_moe", **SIZE).to(torch.bfloat16), path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run(tree: Path, args: list[str] | None) -> int:
    """Peak RSS (KiB) of one CLI command in a fresh interpreter; None: of the imports alone (the floor)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-c", FLOOR] if args is None else [sys.executable, "-c", CHILD, json.dumps(args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    line = [l for l in r.stdout.splitlines() if l.startswith("PEAK_KIB")]
    if r.returncode or not line or line[-1].split()[3] != "0":
        raise SystemExit(f"{args} failed in {tree}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return int(line[-1].split()[1])


def written(path: Path) -> tuple[int, list[str]]:
    from safetensors import safe_open

    dtypes = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            dtypes |= {str(h.get_slice(k).get_dtype()) for k in h.keys()}
    return sum(f.stat().st_size for f in path.glob("*.safetensors")), sorted(dtypes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before-rev", default="main", help="git revision of the code to compare against")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        before.mkdir()
        subprocess.run(f"git -C {ROOT} archive {args.before_rev} | tar -x -C {before}", shell=True, check=True)
        ckpt = tmp / "bf16"
        size = make_checkpoint(ckpt)
        print(f"checkpoint: synthetic qwen3_moe bf16 {size / 2**20:.1f} MiB; CPU, {os.cpu_count()} cores; "
              f"before = {args.before_rev}, after = this tree")
        floor = run(ROOT, None) / 1024
        print(f"floor (python + torch + transformers + secompress imported, no model): {floor:.1f} MiB")
        print(f"{'command':<22}{'tree':<8}{'peak RSS MiB':>14}{'x ckpt':>8}{'above floor':>13}  output")
        rows = []
        for name, tmpl in COMMANDS.items():
            for label, tree in (("before", before), ("after", ROOT)):
                out = tmp / f"{label}-{name.replace(' ', '_')}"
                kib = run(tree, [a.format(model=ckpt, out=out) for a in tmpl])
                row = {"command": name, "tree": label, "peak_rss_mib": round(kib / 1024, 1),
                       "x_checkpoint": round(kib * 1024 / size, 2),
                       "above_floor_x_checkpoint": round((kib / 1024 - floor) * 2**20 / size, 2)}
                note = ""
                if name.startswith("prune"):
                    nbytes, dtypes = written(out)
                    row.update(written_mib=round(nbytes / 2**20, 1), written_dtypes=dtypes)
                    note = f"wrote {nbytes / 2**20:.1f} MiB {','.join(dtypes)}"
                rows.append(row)
                print(f"{name:<22}{label:<8}{row['peak_rss_mib']:>14.1f}{row['x_checkpoint']:>8.2f}"
                      f"{row['above_floor_x_checkpoint']:>12.2f}x  {note}")
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint_mib": round(size / 2**20, 1), "floor_mib": round(floor, 1),
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
