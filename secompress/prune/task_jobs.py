"""Jobs over several task-specific prunes: PreMoe's variants + retrieval index, UNCURL's threshold.

    premoe_variants(model, tok, {"code": "code.jsonl", "prose": "prose.jsonl"}, PruneConfig(0.5, "premoe"), "out/")
        # out/code/, out/prose/ (stock checkpoints, one per task), out/premoe_index.json (the patterns)
        # and out/premoe_router.safetensors (the first MoE layer's full router, to match queries)
    name, dist = select_variant("out/", "def f(x):\\n    return x")   # PreMoe's task-adaptive retrieval
    uncurl_threshold(model, tok, PruneConfig(0.25, "uncurl"), task, held_out)   # factor where quality drops
    uncurl_adaptive(model, tok, PruneConfig(0.5, "uncurl"), task)   # per-layer counts, in memory only

PreMoe (Pei et al. 2025, arXiv 2505.17639; see :mod:`.premoe_math`): each task's pattern is its
TCESS per MoE layer, measured on the original model; a query is matched by L2 to the stored
patterns. ``match="first"`` (the reference code's) compares the first MoE layer's TCESS only: the
router of the first MoE layer sees hidden states that no expert has touched, so the query runs
through any variant up to that router (stored whole in the index folder), and the variant can be
chosen before a single expert is loaded. ``match="all"`` compares every MoE layer's TCESS and
needs the original model.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapters import get_adapter
from ..checkpoints import check_model
from ..data import CalibrationData, load_calibration
from ..errors import SecompressError
from ..outputs import atomic_dir
from ..perplexity import perplexity
from .api import PruneConfig, plan_for, prune, save_pruned
from .layer_stats import capture
from .premoe_math import nearest_pattern, tcess

INDEX_NAME = "premoe_index.json"
ROUTER_NAME = "premoe_router.safetensors"
INDEX_VERSION = 1
MATCHES = ("first", "all")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Stop(Exception):
    """Raised by the router hook once the first MoE layer's input is captured."""


def premoe_variants(model, tokenizer, tasks: dict[str, str | Path | CalibrationData], config: PruneConfig,
                    out: str | Path, profile=None, overwrite: bool = False, match: str = "first") -> Path:
    """One PreMoe-pruned stock checkpoint per task under ``out/<task>/`` and the pattern index.
    ``model`` is left unchanged (each variant prunes a copy). Every task's data is read and checked
    (too few tokens, a ratio below top_k, Super Experts that cannot be spared) before any variant is
    computed; nothing is written unless all succeed."""
    if config.method != "premoe":
        raise ValueError(f"premoe_variants runs PreMoe; the config says '{config.method}'")
    if not tasks:
        raise ValueError("premoe_variants needs at least one task")
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got '{match}'")
    bad = [n for n in tasks if not _NAME.match(n) or n in (INDEX_NAME, ROUTER_NAME)]
    if bad:
        raise ValueError(f"task names {bad} must be 1-64 letters, digits, '_', '.', '-' (they name the variant folders)")
    adapter = check_model(model)
    plan_for(model, config.ratio, "premoe")
    calib = {}
    for name, spec in tasks.items():
        c = spec if isinstance(spec, CalibrationData) else \
            load_calibration(spec, tokenizer, config.calib_samples, config.seq_len)
        config.prune_method.check_data(config, c.num_tokens, f"{name}: {c.source}")
        calib[name] = c
    if profile is None:  # the Super Experts are the model's: profile once, on every task's windows
        from ..profile import ProfileConfig, profile_for

        both = CalibrationData(torch.cat([c.input_ids for c in calib.values()]), "+".join(calib), "tasks")
        profile = profile_for(model, None, tokenizer, both, ProfileConfig(num_samples=both.input_ids.shape[0],
                              seq_len=both.input_ids.shape[1], batch_size=config.batch_size), False)
    layers = adapter.moe_layer_indices(model)
    first = layers[0]
    cfg = dataclasses.replace(config, eval_samples=0)
    results = {}
    with atomic_dir(out, overwrite) as tmp:
        for name, c in calib.items():
            m = copy.deepcopy(model)
            r = prune(m, tokenizer, cfg, profile=profile, data=c)
            save_pruned(m, tokenizer, r, tmp / name)
            results[name] = r
            del m
        router = adapter.router_of(adapter.block_of(adapter.layers(model)[first]))
        save_file({n: getattr(router, n).detach().cpu().contiguous() for n in ("weight", *adapter.router_per_expert)},
                  str(tmp / ROUTER_NAME))  # weight [E, H] (+ bias [E]): the first MoE layer's router, whole
        index = {
            "index_version": INDEX_VERSION, "model": str(getattr(model, "name_or_path", "") or ""),
            "model_type": model.config.model_type, "match": match, "first_moe_layer": first, "moe_layers": layers,
            "ratio": config.ratio, "tcess_top_k": config.tcess_top_k or adapter.top_k(model.config),
            "tcess_threshold": config.tcess_threshold, "protect_super_experts": config.protect_super_experts,
            "super_experts": [list(s) for s in profile.se_ids()],
            "tasks": {n: {"variant": n, "data": calib[n].source, "tokens": calib[n].num_tokens,
                          "experts_after": r.num_experts_after,
                          "tcess": {str(l): r.extra["premoe"]["layers"][str(l)]["scores"] for l in layers},
                          "kept": {str(l): r.kept[l] for l in layers}} for n, r in results.items()},
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    return Path(out)


def load_index(folder: str | Path) -> dict:
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise SecompressError(f"{folder} holds no {INDEX_NAME}: make it with `secompress premoe` (premoe_variants)")
    index = json.loads(path.read_text())
    if index.get("index_version") != INDEX_VERSION:
        raise SecompressError(f"{path}: index_version {index.get('index_version')} is not {INDEX_VERSION}")
    return index


def _pattern(index: dict, name: str, match: str) -> torch.Tensor:
    t = index["tasks"][name]["tcess"]
    keys = [str(index["first_moe_layer"])] if match == "first" else [str(l) for l in index["moe_layers"]]
    return torch.tensor([v for k in keys for v in t[k]], dtype=torch.float64)  # [D]


def _full_router(variant_router: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of a variant's router module holding the original router's tensors (every expert's row)."""
    from .structural import COUNT_ATTR

    r = copy.deepcopy(variant_router)
    for name, t in tensors.items():
        old = getattr(r, name)
        setattr(r, name, torch.nn.Parameter(t.to(old.device, old.dtype), requires_grad=False)
                if isinstance(old, torch.nn.Parameter) else t.to(old.device, old.dtype))
    if isinstance(getattr(r, COUNT_ATTR, None), int):
        setattr(r, COUNT_ATTR, int(tensors["weight"].shape[0]))
    return r


@torch.no_grad()
def query_pattern(model, ids: torch.Tensor, index: dict, match: str, router: dict[str, torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """The query's TCESS ([E] first MoE layer, or [L*E] every MoE layer) from its tokens ``ids [1, S]``.
    ``first``: ``model`` may be any variant (the run stops at the first MoE router, whose original
    tensors ``router`` come from the index folder); ``all``: ``model`` must be the original."""
    adapter = get_adapter(model.config)
    k, r = int(index["tcess_top_k"]), float(index["tcess_threshold"])
    dev = next(model.parameters()).device
    if match == "first":
        block = adapter.block_of(adapter.layers(model)[int(index["first_moe_layer"])])
        got = {}

        def grab(mod, args):
            got["x"] = args[0].detach()
            raise _Stop

        h = adapter.router_of(block).register_forward_pre_hook(grab)
        try:
            model(input_ids=ids.to(dev), use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()
        out = _full_router(adapter.router_of(block), router)(got["x"])
        return tcess((out[0] if isinstance(out, tuple) else out).reshape(ids.numel(), -1).float().cpu(), k, r)
    E = adapter.num_experts(model.config)
    if E != len(index["tasks"][next(iter(index["tasks"]))]["tcess"][str(index["first_moe_layer"])]):
        raise SecompressError("match 'all' needs the original model (every expert's router row): this one has "
                              f"{E} experts per layer")
    store: dict = {}
    with capture(model, adapter, [int(l) for l in index["moe_layers"]], store, False):
        model(input_ids=ids.to(dev), use_cache=False)
    return torch.cat([tcess(store[int(l)]["logits"].reshape(ids.numel(), -1).cpu(), k, r) for l in index["moe_layers"]])


def select_variant(folder: str | Path, text: str, model=None, tokenizer=None, match: str | None = None
                   ) -> tuple[str, dict[str, float]]:
    """PreMoe's retrieval: the task whose stored pattern is nearest to ``text``'s routing, and every
    task's L2 distance. ``model``: the original (needed for ``match='all'``) or any variant; default:
    the first variant in the folder."""
    from ..checkpoints import load_model, load_tokenizer

    folder = Path(folder)
    index = load_index(folder)
    match = match or index["match"]
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got '{match}'")
    names = sorted(index["tasks"])
    if model is None:
        if match == "all":
            raise SecompressError("match 'all' needs the original model: pass model=... (--model)")
        model = load_model(folder / names[0])
    tokenizer = tokenizer or load_tokenizer(folder / names[0])
    if not text.strip():
        raise SecompressError("the prompt is empty: nothing to route")
    enc = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = torch.tensor([([bos] if bos is not None else []) + list(enc)], dtype=torch.long)
    router = load_file(str(folder / ROUTER_NAME)) if match == "first" else None
    q = query_pattern(model, ids, index, match, router)
    best, d = nearest_pattern(q, torch.stack([_pattern(index, n, match) for n in names]))
    return names[best], {n: float(x) for n, x in zip(names, d)}


def uncurl_threshold(model, tokenizer, config: PruneConfig, task, held_out: torch.Tensor,
                     ratios=(0.25, 0.5, 0.75), tolerance: float = 0.05, profile=None) -> dict:
    """UNCURL's threshold pruning factor on one task (Sarkar et al. 2024): UNCURL at each ratio (factor
    E / K) on a copy of ``model``, perplexity on the task's held-out windows ``held_out [N, S]``; the
    threshold is the largest factor whose perplexity stays within ``tolerance`` (relative) of the
    unpruned model's (None if none does). Ratios the router refuses are reported as refused."""
    if config.method != "uncurl":
        raise ValueError(f"uncurl_threshold runs UNCURL; the config says '{config.method}'")
    base = perplexity(model, held_out, config.batch_size)
    rows = []
    for ratio in sorted(ratios):
        m = copy.deepcopy(model)
        try:
            r = prune(m, tokenizer, dataclasses.replace(config, ratio=ratio, eval_samples=0), profile=profile, data=task)
        except ValueError as e:
            rows.append({"ratio": ratio, "refused": str(e)})
            continue
        ppl = perplexity(m, held_out, config.batch_size)
        rows.append({"ratio": ratio, "experts": r.num_experts_after, "perplexity": ppl, "relative": ppl / base - 1.0,
                     "factor": round(r.num_experts_before / r.num_experts_after, 3)})
        del m
    ok = [x for x in rows if "perplexity" in x and x["relative"] <= tolerance]
    return {"baseline_perplexity": base, "tolerance": tolerance, "sweep": rows,
            "threshold_factor": max((x["factor"] for x in ok), default=None)}


def uncurl_adaptive(model, tokenizer, config: PruneConfig, task, profile=None) -> dict:
    """UNCURL with adaptive per-layer counts, in place, in memory only: the same total as
    ``config.ratio`` everywhere, shared out by each layer's eigengap estimate
    (:func:`secompress.prune.uncurl.adaptive_counts`). The model then holds a different count per
    layer: it evaluates, but ``save_pruned`` refuses it (a config stores one count). Returns the
    counts, the estimates and the groups."""
    from ..profile import ProfileConfig, profile_for
    from .seed_stats import collect_seed
    from .select import protected_by_layer
    from .uncurl import STATS, adaptive_counts, apply_uncurl, decide_uncurl, estimate_count, finish_uncurl

    if config.method != "uncurl":
        raise ValueError(f"uncurl_adaptive runs UNCURL; the config says '{config.method}'")
    adapter = check_model(model)
    plan = plan_for(model, config.ratio, "uncurl")
    c = task if isinstance(task, CalibrationData) else load_calibration(task, tokenizer, config.calib_samples,
                                                                        config.seq_len)
    config.prune_method.check_data(config, c.num_tokens, c.source)
    prof = profile_for(model, profile, tokenizer, c, ProfileConfig(num_samples=c.input_ids.shape[0],
                       seq_len=c.input_ids.shape[1], batch_size=config.batch_size), False)
    prot = protected_by_layer(prof.se_ids()) if config.protect_super_experts else {}
    stats = collect_seed(model, adapter, c.input_ids, config.batch_size, STATS)
    est = {l: estimate_count(s, plan, prot.get(l, set())) for l, s in stats.items()}
    counts = adaptive_counts(est, plan, prot)
    decisions = {l: decide_uncurl(s, plan, prot.get(l, ()), counts[l], config.seed) for l, s in stats.items()}
    layers = adapter.layers(model)
    for l, d in decisions.items():
        apply_uncurl(adapter.block_of(layers[l]), adapter, d, stats[l].freq, adapter.block_path(l))
    finish_uncurl(model, adapter, max(counts.values()))
    return {"experts_per_layer": {str(l): n for l, n in counts.items()}, "eigengap_estimate": {str(l): n for l, n in
            est.items()}, "groups": {str(l): d.to_json() for l, d in decisions.items()}}
