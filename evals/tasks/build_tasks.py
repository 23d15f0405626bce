"""Build the offline lm-eval tasks' data from the reference corpus's held-out files.

    python evals/tasks/build_tasks.py      # rewrites the two .jsonl files here (deterministic)

Files used for the built-in calibration text are left out.
- stdlib_heldout.jsonl: {"path", "text"}: the first 4 kB of each held-out file (rolling loglikelihood);
- stdlib_nextline.jsonl: {"context", "choices", "label"}: six lines of held-out code, the real next
  line and three lines of similar length drawn from other held-out files (multiple choice).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "reference"))
from corpus import CALIBRATION_FILES, heldout_texts  # noqa: E402

DOC_BYTES, MC_ITEMS, CONTEXT_LINES = 4096, 200, 6


def main() -> None:
    rng = random.Random(0)
    files = [(rel, t) for rel, t in heldout_texts() if rel not in CALIBRATION_FILES]
    with open(HERE / "stdlib_heldout.jsonl", "w") as f:
        for rel, text in files:
            if text.strip():
                f.write(json.dumps({"path": rel, "text": text[:DOC_BYTES]}) + "\n")
    pool = [(rel, line) for rel, text in files for line in text.splitlines() if len(line.strip()) >= 12]
    items = []
    while len(items) < MC_ITEMS:
        rel, text = rng.choice(files)
        lines = text.splitlines()
        if len(lines) <= CONTEXT_LINES + 1:
            continue
        i = rng.randrange(CONTEXT_LINES, len(lines))
        target = lines[i]
        if len(target.strip()) < 12:
            continue
        others = [l for r, l in rng.sample(pool, 400) if r != rel and abs(len(l) - len(target)) <= 8
                  and l != target][:3]
        if len(others) < 3:
            continue
        choices = others + [target]
        rng.shuffle(choices)
        items.append({"path": rel, "context": "\n".join(lines[i - CONTEXT_LINES: i]), "choices": choices,
                      "label": choices.index(target)})
    with open(HERE / "stdlib_nextline.jsonl", "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    print(f"{len(files)} held-out files, {len(items)} multiple-choice items")


if __name__ == "__main__":
    main()
