"""``secompress run RECIPE [--out DIR] [--override key=value ...] [--dry-run]``."""
from __future__ import annotations

import json
from pathlib import Path

from .args import add_command, output_parent


def _add(sub) -> None:
    p = add_command(sub, "run", "run a recipe: profile, prune, quantize, evaluate, export, push",
                    parents=(output_parent(required=False, default_help="; default: out/<recipe name>"),))
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change one recipe value, e.g. stages.prune.ratio=0.5 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="push: list what would be uploaded, upload nothing")
    p.add_argument("--device", default=None, metavar="auto|cpu|cuda|cuda:N",
                   help="compute device (overrides model.device; auto: CUDA when present)")
    p.add_argument("--streaming", default=None, choices=("auto", "on", "off"),
                   help="layer by layer (on), in memory (off) or by size (auto; overrides model.streaming)")


def _run(args) -> int:
    from ..recipe.run import run_recipe
    from ..recipe.schema import load_recipe

    overrides = list(args.override)
    if args.device:
        overrides.append(f"model.device={args.device}")
    if args.streaming:
        overrides.append("model.streaming=" + {"auto": "null", "on": "true", "off": "false"}[args.streaming])
    recipe = load_recipe(args.recipe, overrides)
    text = Path(args.recipe).read_text(encoding="utf-8")
    if args.override:
        text += "\n# overrides: " + ", ".join(args.override) + "\n"
    out, root = (args.out, None) if args.out else (Path("out") / recipe.name, Path("out"))
    say = lambda line: print(line, flush=True)  # noqa: E731 -- each stage as it happens, not at exit
    say(f"recipe {recipe.name}: stages {' -> '.join(recipe.stage_names)}")
    res = run_recipe(recipe, text, out, overwrite=args.overwrite, dry_run=args.dry_run, root=root,
                     inputs=(args.recipe,), announce=say, report=say)
    m = res.manifest
    say(f"ran {m['mode']} on {m['device']}")
    for note in m.get("notes", []):
        say(f"note: {note}")
    print(f"Super Experts: {m['super_experts'] or 'none'} (profile cache {'hit' if m['profile_cache_hit'] else 'miss'})")
    if res.comparison is not None:
        print(res.comparison.markdown())
        if m.get("se_effect"):
            print(f"SE effect: {m['se_effect']}")
    if m.get("export"):
        e = m["export"]
        print(f"export: {e['bytes'] / 2**20:.1f} MiB in {e['files']} files, {e['ratio']:.2f}x the checkpoint's "
              f"{e['source_bytes'] / 2**20:.1f} MiB")
    plan_file = Path(res.out) / "model" / "quantization_plan.json"
    if plan_file.is_file() and "compatibility" in (plan := json.loads(plan_file.read_text())):
        fmt = plan.get("export", {}).get("format", plan.get("meta", {}).get("method", "rtn"))
        print(f"export ({fmt}) loads with:")
        for rt, v in plan["compatibility"].items():
            print(f"  {rt:<16}{'yes' if v['ok'] else 'no':<5}{v['why']}")
    if "push" in m:
        verb = "would upload" if m["push"]["dry_run"] else "uploaded"
        print(f"push to {m['push']['repo_id']}: {verb} {len(m['push']['files'])} files: {', '.join(m['push']['files'])}")
    print(f"wall {m['wall_seconds']} s, peak RSS {m['peak_rss_mib']} MiB; wrote {res.out}/")
    return 0


COMMAND = (_add, _run)
