"""Issue 21's fault matrix: corrupted checkpoints, hostile indexes and a foreign output folder, each
run through every command (profile, prune, quantize, run) in memory and streamed, as a new user
would (one fresh ``python -m secompress`` process per cell).

    python3 evals/integrity_matrix.py --tree . --out evals/results/integrity_after.md
    git archive main | tar -x -C /tmp/main-copy   # the code before (main without this branch)
    python3 evals/integrity_matrix.py --tree /tmp/main-copy --out evals/results/integrity_before.md

Per cell: exit status, what the user saw (the ``secompress: error:`` line, the exception of a
traceback, or "ok"), whether an output folder was written or replaced, and whether a hostile
pickle's marker file appeared. The checkpoints are tiny random Qwen3-MoE models
(``secompress.testing``); the table is written as Markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST = ["--samples", "2", "--seq-len", "16", "--batch-size", "2"]
RECIPE = """\
version: 1
name: tiny
model: {{id: {model}, model_type: qwen3_moe}}
data: {{num_samples: 2, seq_len: 16, batch_size: 2, eval_samples: 2}}
stages:
  - profile: {{}}
  - prune: {{ratio: 0.25, method: frequency}}
  - quantize: {{method: rtn, bits: 4, group_size: 32}}
  - evaluate: {{perplexity: true}}
  - export: {{}}
"""
COMMANDS = ["profile", "profile --streaming", "prune", "prune --streaming", "quantize", "quantize --streaming",
            "run", "run --streaming"]


class _Marker:
    """A legacy pickle payload: unpickling it writes the file named by MARKER."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pickle ran')",))


def _tiny(folder: Path) -> Path:
    from secompress.testing import make_tiny, save_tiny

    return save_tiny(make_tiny("qwen3_moe", num_hidden_layers=3), folder)


def _edit(model: Path, fn) -> None:
    """Rewrite the single shard with ``fn(state_dict)`` applied."""
    from safetensors.torch import load_file, save_file

    f = model / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def _split(model: Path, moved: list[str], target: str, write) -> None:
    """Move ``moved`` keys out of model.safetensors into ``target`` (written by ``write(tensors, path)``),
    with an index routing them there; the rest goes to a shard whose name sorts after ``target`` (transformers
    picks its loader, safetensors or torch.load, by the first shard's name)."""
    from safetensors.torch import load_file, save_file

    f = model / "model.safetensors"
    sd = load_file(f)
    part = {k: sd.pop(k) for k in moved}
    save_file(sd, model / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    f.unlink()
    if write is not None:
        write(part, target if os.path.isabs(target) else model / target)
    wm = {k: "model-00002-of-00002.safetensors" for k in sd} | {k: target for k in part}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


L1 = "model.layers.1."
CASES = {
    "missing attention o_proj (layer 2)": lambda m, ws: _edit(m, lambda sd: sd.pop("model.layers.2.self_attn.o_proj.weight")),
    "missing layer norm (layer 2)": lambda m, ws: _edit(m, lambda sd: sd.pop("model.layers.2.post_attention_layernorm.weight")),
    "missing expert tensor": lambda m, ws: _edit(m, lambda sd: sd.pop(L1 + "mlp.experts.3.down_proj.weight")),
    "extra expert tensor (expert 8 of 8)": lambda m, ws: _edit(
        m, lambda sd: sd.__setitem__(L1 + "mlp.experts.8.gate_proj.weight", sd[L1 + "mlp.experts.0.gate_proj.weight"].clone())),
    "wrong-shape expert tensor": lambda m, ws: _edit(
        m, lambda sd: sd.__setitem__(L1 + "mlp.experts.3.up_proj.weight", sd[L1 + "mlp.experts.3.up_proj.weight"][:16].clone())),
    "missing router": lambda m, ws: _edit(m, lambda sd: sd.pop(L1 + "mlp.gate.weight")),
    "wrong-shape attention q_proj": lambda m, ws: _edit(
        m, lambda sd: sd.__setitem__(L1 + "self_attn.q_proj.weight", sd[L1 + "self_attn.q_proj.weight"][:32].clone())),
    "missing embeddings": lambda m, ws: _edit(m, lambda sd: sd.pop("model.embed_tokens.weight")),
    "missing lm_head (untied)": lambda m, ws: _edit(m, lambda sd: sd.pop("lm_head.weight")),
    "unexpected tensor": lambda m, ws: _edit(
        m, lambda sd: sd.__setitem__(L1 + "mlp.extra.weight", sd[L1 + "mlp.gate.weight"].clone())),
    "integer dtype norm": lambda m, ws: _edit(
        m, lambda sd: sd.__setitem__("model.norm.weight", sd["model.norm.weight"].to(__import__("torch").int32))),
    "index -> .bin with side-effect pickle": lambda m, ws: _split(
        m, ["model.norm.weight"], "model-00001-of-00002.bin",
        lambda part, p: Path(p).write_bytes(pickle.dumps(_Marker(str(ws / "MARKER"))))),
    "index -> benign torch.save .bin": lambda m, ws: _split(
        m, ["model.norm.weight"], "model-00001-of-00002.bin",
        lambda part, p: __import__("torch").save(part, p)),
    "index -> /etc/passwd": lambda m, ws: _split(m, ["model.norm.weight"], "/etc/passwd", None),
    "index -> ../ safetensors outside the folder": lambda m, ws: _split(
        m, ["model.norm.weight"], "../model-00001-of-00002.safetensors",
        lambda part, p: __import__("safetensors.torch").torch.save_file(part, str(p))),
}


def _argv(cmd: str, model: Path, ws: Path, out: Path) -> list[str]:
    name, *flags = cmd.split()
    if name == "run":
        recipe = ws / "recipe.yaml"
        recipe.write_text(RECIPE.format(model=model))
        return ["run", str(recipe), "--out", str(out), "--dry-run", "--streaming", "on" if flags else "off"]
    extra = {"profile": ["--no-plots"], "prune": ["--ratio", "0.25", "--method", "frequency", "--eval-samples", "0"],
             "quantize": ["--group-size", "32"]}[name]
    return [name, str(model), "--out", str(out), *FAST, *extra, *flags]


def _outcome(proc, out: Path, marker: Path, foreign: Path | None) -> dict:
    err = proc.stderr.splitlines()
    line = next((x for x in err if x.startswith("secompress: error:")), None)
    if proc.returncode == 0:
        seen = "ok"
    elif line is not None:
        seen = line.removeprefix("secompress: error: ")
    else:
        tb = [x for x in err if x and not x.startswith(" ")]
        seen = "traceback: " + (tb[-1] if tb else "?")
    written = out.is_dir() and any(out.iterdir())
    if foreign is not None:
        written = not (out / "thesis.tex").is_file()  # the foreign folder was replaced
    seen = seen.replace(str(out.parent), "WS")
    return {"rc": proc.returncode, "seen": seen[:200], "written": written, "marker": marker.exists()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=".", help="the secompress source tree to run (put first on PYTHONPATH)")
    ap.add_argument("--out", required=True, help="Markdown table to write")
    ap.add_argument("--json", default=None, help="also write the raw cells as JSON")
    ap.add_argument("--cases", default=None, help="comma-separated substrings: only these cases")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(Path(args.tree).resolve()), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    root = Path(tempfile.mkdtemp(prefix="integrity-matrix-"))
    env["SECOMPRESS_CACHE"] = str(root / "cache")
    good = _tiny(root / "good")
    # the command line: ``python -m secompress`` (a package since issue 20), ``secompress.cli`` before
    entry = "secompress" if (Path(args.tree) / "secompress" / "__main__.py").is_file() else "secompress.cli"
    cells: dict[str, dict[str, dict]] = {}
    cases = dict(CASES)
    foreign_flags = {"--overwrite onto a folder secompress did not write": ["--overwrite"],
                     "--overwrite --force onto that folder": ["--overwrite", "--force"]}
    cases.update(dict.fromkeys(foreign_flags))
    for case in cases:
        if args.cases and not any(s in case for s in args.cases.split(",")):
            continue
        cells[case] = {}
        for cmd in COMMANDS:
            ws = root / f"ws-{len(cells)}-{cmd.replace(' ', '')}"
            ws.mkdir()
            model = Path(shutil.copytree(good, ws / "model"))
            out, foreign = ws / "out", None
            argv = _argv(cmd, model, ws, out)
            if cases[case] is None:
                foreign = out
                (out / ".git").mkdir(parents=True)
                (out / "thesis.tex").write_text("four years of work")
                argv += foreign_flags[case]
            else:
                cases[case](model, ws)
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", entry, *argv], env=env, cwd=ws,
                                  capture_output=True, text=True)
            cells[case][cmd] = _outcome(proc, out, ws / "MARKER", foreign) | {"s": round(time.time() - t0, 1)}
            print(f"{case:<50} {cmd:<22} rc={proc.returncode} {cells[case][cmd]['seen'][:90]}", flush=True)
            shutil.rmtree(ws, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    lines = ["| case | " + " | ".join(COMMANDS) + " |", "|---|" + "---|" * len(COMMANDS)]
    for case, row in cells.items():
        def cell(c):
            if c is None:
                return ""
            tag = f"exit {c['rc']}" + (", WROTE" if c["written"] else "") + (", MARKER" if c["marker"] else "")
            return tag if c["rc"] == 0 else f"{tag}: {c['seen'][:70]}"
        lines.append(f"| {case} | " + " | ".join(cell(row.get(c)) for c in COMMANDS) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
