"""Build the two task datasets of the seed-method benchmark (evals/bench_seeds.py): code vs prose.

    python evals/tasks/build_seed_tasks.py      # rewrites the seed_*.jsonl files here (deterministic)

Both come from the CPython standard library the reference model was trained on
(evals/reference/corpus.py), split two ways:
- by text kind: "code" is each file's Python with every comment and docstring removed (``tokenize``
  finds comments, ``ast`` finds docstrings), "prose" is the comments (without ``#``) and the
  docstrings (dedented) of the same files, in file order;
- by file: calibration texts come from training-split files, evaluation texts from held-out files
  (corpus hash split), never the held-out files the built-in calibration text is made of.

Files written, per task T in (code, prose):
- seed_T_calib.jsonl: {"path", "text"}: task-specific calibration (train-split files, ~CALIB_BYTES);
- seed_T_eval.jsonl: {"path", "text"}: held-out text for perplexity and retrieval queries;
- seed_T_nextline.jsonl: {"context", "choices", "label"}: six lines of held-out task text, the real
  next line and three lines of similar length from other held-out files of the same kind (the
  multiple choice of evals/tasks/stdlib_nextline.jsonl, per task).
"""
from __future__ import annotations

import ast
import io
import json
import random
import sys
import textwrap
import tokenize
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "reference"))
from corpus import CALIBRATION_FILES, _is_heldout, list_files  # noqa: E402

CALIB_BYTES, EVAL_BYTES, MC_ITEMS, CONTEXT_LINES, MIN_LINE = 120_000, 60_000, 150, 6, 12
TASKS = ("code", "prose")


def split_kinds(src: str) -> tuple[str, str] | None:
    """(code without comments and docstrings, comments + docstrings) of one Python file; None if it
    does not parse."""
    try:
        tree = ast.parse(src)
        toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (SyntaxError, tokenize.TokenError, ValueError):
        return None
    lines = src.splitlines()
    drop: set[int] = set()  # 0-based line numbers of docstrings
    prose: list[tuple[int, str]] = []  # (line, text)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                drop.update(range(first.lineno - 1, first.end_lineno))
                prose.append((first.lineno, textwrap.dedent(first.value.value).strip()))
    comment_cols: dict[int, int] = {}
    for t in toks:
        if t.type == tokenize.COMMENT:
            comment_cols[t.start[0] - 1] = t.start[1]
            text = t.string.lstrip("#").strip()
            if text and not text.startswith("!"):
                prose.append((t.start[0], text))
    code = []
    for i, line in enumerate(lines):
        if i in drop:
            continue
        if i in comment_cols:
            line = line[: comment_cols[i]].rstrip()
        if line.strip():
            code.append(line)
    prose.sort(key=lambda p: p[0])
    return "\n".join(code), "\n".join(p for _, p in prose if p)


def _texts(files) -> dict[str, list[tuple[str, str]]]:
    out = {t: [] for t in TASKS}
    for rel, path in files:
        kinds = split_kinds(path.read_text(encoding="utf-8", errors="replace"))
        if kinds is None:
            continue
        for task, text in zip(TASKS, kinds):
            if text.strip():
                out[task].append((rel, text))
    return out


def _take(items: list[tuple[str, str]], budget: int, rng: random.Random) -> list[dict]:
    items = items[:]
    rng.shuffle(items)
    out, n = [], 0
    for rel, text in items:
        if n >= budget:
            break
        text = text[: budget - n]
        out.append({"path": rel, "text": text})
        n += len(text)
    return out


def _nextline(items: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    pool = [(rel, line) for rel, text in items for line in text.splitlines() if len(line.strip()) >= MIN_LINE]
    mc, tries = [], 0
    while len(mc) < MC_ITEMS and tries < 100_000:
        tries += 1
        rel, text = rng.choice(items)
        lines = text.splitlines()
        if len(lines) <= CONTEXT_LINES + 1:
            continue
        i = rng.randrange(CONTEXT_LINES, len(lines))
        target = lines[i]
        if len(target.strip()) < MIN_LINE:
            continue
        others = [l for r, l in rng.sample(pool, min(400, len(pool))) if r != rel
                  and abs(len(l) - len(target)) <= 8 and l != target][:3]
        if len(others) < 3:
            continue
        choices = others + [target]
        rng.shuffle(choices)
        mc.append({"path": rel, "context": "\n".join(lines[i - CONTEXT_LINES: i]), "choices": choices,
                   "label": choices.index(target)})
    return mc


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    files = list_files()
    held = [(r, p) for r, p in files if _is_heldout(r) and r not in CALIBRATION_FILES]
    train = [(r, p) for r, p in files if not _is_heldout(r)]
    rng = random.Random(0)
    train_texts = _texts(rng.sample(train, 400))
    held_texts = _texts(held)
    for task in TASKS:
        _write(HERE / f"seed_{task}_calib.jsonl", _take(train_texts[task], CALIB_BYTES, random.Random(1)))
        _write(HERE / f"seed_{task}_eval.jsonl", _take(held_texts[task], EVAL_BYTES, random.Random(2)))
        mc = _nextline(held_texts[task], random.Random(3))
        _write(HERE / f"seed_{task}_nextline.jsonl", mc)
        print(f"{task}: calibration {sum(len(t) for _, t in train_texts[task])} bytes available, eval "
              f"{sum(len(t) for _, t in held_texts[task])} bytes in {len(held_texts[task])} held-out files, "
              f"{len(mc)} next-line items")


if __name__ == "__main__":
    main()
