"""The recipe file: a versioned YAML schema, validated strictly.

    version: 1
    name: qwen3-30b-a3b-se4bit
    model: {id: Qwen/Qwen3-30B-A3B, revision: main, dtype: bfloat16, model_type: qwen3_moe}
    data: {calibration: builtin, num_samples: 128, seq_len: 512, eval: builtin}
    stages:
      - profile: {streaming: true}
      - prune: {ratio: 0.25, method: reap}
      - quantize: {method: rtn, bits: 4, group_size: 128, se_bits: 16}
      - evaluate: {perplexity: true, tasks: [wikitext]}
      - export: {}
      - push: {repo_id: me/model-se4bit, private: true}

Every error names the file, the line and the key: unknown keys, wrong types, and
impossible combinations (a stage twice, push without export, evaluate before anything
to evaluate, a prune ratio outside (0, 1), ...).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from ..errors import SecompressError

SCHEMA_VERSION = 1
DTYPES = ("auto", "float32", "bfloat16", "float16")  # "auto": the checkpoint's own dtype
# a recipe's name becomes a folder name under the output root: one plain path component only
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RecipeError(SecompressError):
    """A recipe that does not match the schema; the message points at the line and key."""


@dataclass(frozen=True)
class ModelSpec:
    id: str  # hub id or local folder
    revision: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    model_type: str | None = None  # lets `secompress validate` check the adapter without the network


@dataclass(frozen=True)
class DataSpec:
    calibration: str = "builtin"  # builtin | file.txt | file.jsonl | hf:NAME[:CONFIG]:SPLIT
    num_samples: int = 32
    seq_len: int = 512
    batch_size: int = 8
    eval: str | None = None  # held-out text for perplexity; None = windows after the calibration ones
    eval_samples: int = 16


@dataclass(frozen=True)
class ProfileStage:
    layer_fraction: float = 0.75
    percentile: float = 99.5
    max_ratio: float = 0.1
    streaming: bool = False


@dataclass(frozen=True)
class PruneStage:
    ratio: float = 0.25
    method: str = "reap"
    protect_super_experts: bool = True


@dataclass(frozen=True)
class QuantizeStage:
    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    se_mode: str = "expert"  # expert | layer
    se_bits: int | None = None  # None: SEs stay 16-bit
    avg_bits: float | None = None
    fallback: str | None = None  # "rtn": experts without calibration tokens get RTN instead of an error


@dataclass(frozen=True)
class EvaluateStage:
    perplexity: bool = True
    tasks: list[str] = field(default_factory=list)  # lm-eval task names
    task_paths: list[str] = field(default_factory=list)  # extra lm-eval task folders (e.g. evals/tasks)
    limit: int | None = None
    compare_se_unaware: bool = True  # also run the same recipe with SE protection off
    recovery_threshold: float | None = None  # fail the run if any metric recovers less than this
    sink_check: float | None = None  # fail the run if the massive ratio or sink mass falls below this x baseline


@dataclass(frozen=True)
class ExportStage:
    model_card: bool = True


@dataclass(frozen=True)
class PushStage:
    repo_id: str
    private: bool = True
    commit_message: str = "Upload compressed model (secompress)"


STAGES: dict[str, type] = {"profile": ProfileStage, "prune": PruneStage, "quantize": QuantizeStage,
                           "evaluate": EvaluateStage, "export": ExportStage, "push": PushStage}
ORDER = list(STAGES)  # stages must appear in this order (each may be left out)


@dataclass(frozen=True)
class Recipe:
    version: int
    name: str
    model: ModelSpec
    data: DataSpec = DataSpec()
    stages: tuple[tuple[str, Any], ...] = ()
    source: str = "<recipe>"

    def stage(self, name: str):
        return next((cfg for n, cfg in self.stages if n == name), None)

    @property
    def stage_names(self) -> list[str]:
        return [n for n, _ in self.stages]


# ---- parsing with line numbers ------------------------------------------------------------

def _where(src: str, node) -> str:
    return f"{src}:{node.start_mark.line + 1}"


def _check_type(value, hint, path: str, at: str):
    origin = get_origin(hint)
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        opts = get_args(hint)
        if value is None and type(None) in opts:
            return None
        errors = []
        for opt in (o for o in opts if o is not type(None)):
            try:
                return _check_type(value, opt, path, at)
            except RecipeError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{at}: '{path}' must be a list, got {type(value).__name__}")
        return [_check_type(v, get_args(hint)[0], f"{path}[{i}]", at) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise RecipeError(f"{at}: '{path}' must be {hint.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _build(cls, node, src: str, path: str):
    import yaml

    if node is None:
        node = yaml.MappingNode("tag:yaml.org,2002:map", [])
    if not isinstance(node, yaml.MappingNode):
        raise RecipeError(f"{_where(src, node)}: '{path}' must be a mapping")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for k_node, v_node in node.value:
        key = k_node.value
        if key not in names:
            raise RecipeError(f"{_where(src, k_node)}: unknown key '{key}' in '{path}' "
                              f"(allowed: {', '.join(sorted(names))})")
        kwargs[key] = _check_type(yaml.safe_load(yaml.serialize(v_node)), hints[key], f"{path}.{key}",
                                  _where(src, v_node))
    missing = [f.name for f in fields(cls) if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{_where(src, node)}: '{path}' needs {', '.join(missing)}")
    try:
        return cls(**kwargs), node
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{_where(src, node)}: '{path}': {e}") from None


def parse_recipe(text: str, source: str = "<recipe>", overrides: list[str] = ()) -> Recipe:
    """Parse and validate a recipe's YAML text; ``overrides`` are ``dotted.key=value`` strings."""
    import yaml

    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {e}") from None
    if root is None or not isinstance(root, yaml.MappingNode):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with version, name, model and stages")
    for ov in overrides:
        root = _apply_override(root, ov, source)
    top = {k.value: (k, v) for k, v in root.value}
    allowed = {"version", "name", "model", "data", "stages"}
    for key, (k, _) in top.items():
        if key not in allowed:
            raise RecipeError(f"{_where(source, k)}: unknown top-level key '{key}' (allowed: {', '.join(sorted(allowed))})")
    for key in ("version", "name", "model"):
        if key not in top:
            raise RecipeError(f"{source}: missing top-level key '{key}'")
    version = yaml.safe_load(yaml.serialize(top["version"][1]))
    if version != SCHEMA_VERSION:
        raise RecipeError(f"{_where(source, top['version'][1])}: recipe version {version!r} is not supported "
                          f"(this secompress reads version {SCHEMA_VERSION})")
    name = _check_type(yaml.safe_load(yaml.serialize(top["name"][1])), str, "name", _where(source, top["name"][1]))
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise RecipeError(f"{_where(source, top['name'][1])}: 'name' must be one plain folder name (letters, digits, "
                          f"'.', '_', '-'; no '/' or '..'), got {name!r}: it names the output folder")
    model, _ = _build(ModelSpec, top["model"][1], source, "model")
    data, _ = _build(DataSpec, top["data"][1], source, "data") if "data" in top else (DataSpec(), None)
    stages = _parse_stages(top.get("stages", (None, None))[1], source)
    recipe = Recipe(version, name, model, data, tuple(stages), source)
    _check_combinations(recipe, model, data)
    return recipe


def _parse_stages(node, src: str) -> list[tuple[str, Any]]:
    import yaml

    if node is None or not isinstance(node, yaml.SequenceNode) or not node.value:
        raise RecipeError(f"{src}: 'stages' must be a non-empty list such as [profile: {{}}, export: {{}}]")
    out, last = [], -1
    for item in node.value:
        if not isinstance(item, yaml.MappingNode) or len(item.value) != 1:
            raise RecipeError(f"{_where(src, item)}: each stage is a one-key mapping, e.g. '- prune: {{ratio: 0.25}}'")
        k_node, v_node = item.value[0]
        name = k_node.value
        if name not in STAGES:
            raise RecipeError(f"{_where(src, k_node)}: unknown stage '{name}' (stages: {', '.join(ORDER)})")
        if name in (n for n, _ in out):
            raise RecipeError(f"{_where(src, k_node)}: stage '{name}' appears twice")
        if ORDER.index(name) < last:
            raise RecipeError(f"{_where(src, k_node)}: stage '{name}' must come before '{ORDER[last]}' "
                              f"(order: {' -> '.join(ORDER)})")
        last = ORDER.index(name)
        cfg, _ = _build(STAGES[name], v_node if not (isinstance(v_node, yaml.ScalarNode) and v_node.value in
                                                     ("", "null", "~")) else None, src, f"stages.{name}")
        out.append((name, cfg))
    return out


def _check_combinations(r: Recipe, model: ModelSpec, data: DataSpec) -> None:
    names = r.stage_names
    src = r.source
    if "push" in names and "export" not in names:
        raise RecipeError(f"{src}: stage 'push' needs an 'export' stage before it")
    if model.dtype not in DTYPES:
        raise RecipeError(f"{src}: model.dtype must be one of {', '.join(DTYPES)}, got '{model.dtype}'")
    if data.num_samples < 1 or data.seq_len < 2 or data.batch_size < 1 or data.eval_samples < 1:
        raise RecipeError(f"{src}: data.num_samples, batch_size and eval_samples must be >= 1, seq_len >= 2")
    pr = r.stage("prune")
    if pr is not None and not 0.0 < pr.ratio < 1.0:
        raise RecipeError(f"{src}: stages.prune.ratio must be in (0, 1), got {pr.ratio}")
    q = r.stage("quantize")
    if q is not None:
        if q.se_mode not in ("expert", "layer"):
            raise RecipeError(f"{src}: stages.quantize.se_mode must be 'expert' or 'layer', got '{q.se_mode}'")
        if q.method not in ("rtn", "bnb", "gptq"):
            raise RecipeError(f"{src}: stages.quantize.method must be 'rtn', 'bnb' or 'gptq', got '{q.method}'")
        if q.fallback not in (None, "rtn"):
            raise RecipeError(f"{src}: stages.quantize.fallback must be null or 'rtn', got {q.fallback!r}")
        if q.se_bits not in (None, 8, 16):
            raise RecipeError(f"{src}: stages.quantize.se_bits must be 8, 16 or null, got {q.se_bits}")
    ev = r.stage("evaluate")
    if ev is not None and ev.recovery_threshold is not None and not 0 < ev.recovery_threshold <= 1:
        raise RecipeError(f"{src}: stages.evaluate.recovery_threshold must be in (0, 1]")
    if ev is not None and ev.sink_check is not None and not 0 < ev.sink_check <= 1:
        raise RecipeError(f"{src}: stages.evaluate.sink_check must be in (0, 1] (a fraction of the baseline's)")
    if ev is not None and not ev.perplexity and not ev.tasks:
        raise RecipeError(f"{src}: stages.evaluate has nothing to measure (perplexity: false and no tasks)")


def _apply_override(root, override: str, src: str):
    """``stages.prune.ratio=0.5`` or ``model.dtype=bfloat16``: replace (or add) one scalar."""
    import yaml

    if "=" not in override:
        raise RecipeError(f"override '{override}' must look like key.path=value")
    path, value = override.split("=", 1)
    keys = path.split(".")
    node = root
    for i, key in enumerate(keys):
        if isinstance(node, yaml.SequenceNode):  # stages: find the one-key mapping named `key`
            match = [it.value[0][1] for it in node.value if isinstance(it, yaml.MappingNode) and it.value
                     and it.value[0][0].value == key]
            if not match:
                raise RecipeError(f"override '{override}': no stage '{key}' in the recipe")
            node = match[0]
            continue
        if not isinstance(node, yaml.MappingNode):
            raise RecipeError(f"override '{override}': '{'.'.join(keys[:i])}' is not a mapping")
        child = next((v for k, v in node.value if k.value == key), None)
        if i == len(keys) - 1:
            new = yaml.compose(value) or yaml.ScalarNode("tag:yaml.org,2002:null", "null")
            pairs = [(k, v) for k, v in node.value if k.value != key]
            node.value = pairs + [(yaml.ScalarNode("tag:yaml.org,2002:str", key, start_mark=root.start_mark), new)]
            if new.start_mark is None:
                new.start_mark = root.start_mark
            return root
        if child is None:
            raise RecipeError(f"override '{override}': no key '{key}'")
        node = child
    return root


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe '{path}' does not exist")
    return parse_recipe(p.read_text(encoding="utf-8"), str(p), list(overrides))
