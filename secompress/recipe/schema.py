"""The recipe file: a versioned YAML schema whose stages are the API's own configs.

    version: 1
    name: qwen3-30b-a3b-se4bit
    model: {id: Qwen/Qwen3-30B-A3B, revision: main, dtype: bfloat16, model_type: qwen3_moe}
    data: {calibration: builtin, num_samples: 128, seq_len: 512, eval: builtin}
    stages:
      - profile: {streaming: true}                        # ProfileConfig (+ SERule keys)
      - prune: {ratio: 0.25, method: reap}               # PruneConfig
      - quantize: {method: rtn, bits: 4, group_size: 128, se_bits: 16}   # QuantConfig
      - evaluate: {perplexity: true, tasks: [wikitext]}
      - export: {format: compressed-tensors}          # QuantConfig.format (default)
      - push: {repo_id: me/model-se4bit, private: true}

``profile``, ``prune`` and ``quantize`` are built straight into
:class:`~secompress.profile.ProfileConfig`, :class:`~secompress.prune.PruneConfig` and
:class:`~secompress.quant.config.QuantConfig` (whose ``options`` mapping becomes the
backend's options dataclass); their calibration sizes and dtype come from ``data`` and
``model``. Every error names the file, the line and the key: unknown keys, wrong types,
values the configs refuse, impossible combinations, and (:func:`check_against_checkpoint`,
before any weight is read) values the checkpoint's config.json refutes.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from ..devices import check_device
from ..dtypes import DEFAULT_DTYPE, check_dtype
from ..errors import SecompressError, RecipeError
from ..profile import DEFAULT_BATCH_SIZE, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, ProfileConfig
from ..prune.api import PruneConfig
from ..quant.config import QuantConfig, backend_for
from ..quant.plan import Rule
from ..se_rule import SERule

SCHEMA_VERSION = 1
# a recipe's name becomes a folder name under the output root: one plain path component only
EVAL_BACKENDS = ("hf", "vllm")  # evaluate.backend: what runs the lm-eval tasks
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ModelSpec:
    id: str  # hub id or local folder
    revision: str | None = None
    dtype: str = DEFAULT_DTYPE  # a secompress.dtypes name; "auto": the checkpoint's own
    trust_remote_code: bool = False
    model_type: str | None = None  # lets a recipe be checked against its adapter without the network
    streaming: bool | None = None  # layer by layer; None: when the checkpoint exceeds memory_share x available memory
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto: CUDA when present)
    memory_share: float = 0.25  # an in-memory run holds 2.5-4x the checkpoint (deep copy for the SE-unaware pass)

    def __post_init__(self):
        check_dtype(self.dtype)
        check_device(self.device)
        if not 0.0 < self.memory_share <= 1.0:
            raise ValueError(f"memory_share must be in (0, 1], got {self.memory_share}")


@dataclass(frozen=True)
class DataSpec:
    calibration: str = "builtin"  # builtin | file.txt | file.jsonl | hf:NAME[:CONFIG]:SPLIT
    num_samples: int = DEFAULT_NUM_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    eval: str | None = None  # held-out text for perplexity; None = windows after the calibration ones
    eval_samples: int = 16

    def __post_init__(self):
        for k in ("num_samples", "batch_size", "eval_samples"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")


@dataclass(frozen=True)
class EvaluateStage:
    perplexity: bool = True
    tasks: list[str] = field(default_factory=list)  # lm-eval task names
    task_paths: list[str] = field(default_factory=list)  # extra lm-eval task folders (e.g. evals/tasks)
    limit: int | None = None
    compare_se_unaware: bool = True  # also run the same recipe with SE protection off
    recovery_threshold: float | None = None  # fail the run if any metric recovers less than this
    sink_check: float | None = None  # fail the run if the massive ratio or sink mass falls below this x baseline
    # how lm-eval runs the tasks: hf (transformers; in memory, or the export with device_map=auto in a streamed
    # run) | vllm (the exported checkpoint in vLLM; needs a GPU and an export vLLM loads)
    backend: str = "hf"
    tensor_parallel_size: int = 1  # vllm: GPUs one model is split over
    gpu_memory_utilization: float = 0.9  # vllm: share of each GPU's memory vLLM may take
    max_model_len: int | None = None  # vllm: context length to reserve KV cache for (None: the model's own)

    def __post_init__(self):
        if self.backend not in EVAL_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(EVAL_BACKENDS)}, got {self.backend!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.backend != "vllm":
            odd = [k for k, v in (("tensor_parallel_size", 1), ("gpu_memory_utilization", 0.9),
                                  ("max_model_len", None)) if getattr(self, k) != v]
            if odd:
                raise ValueError(f"{odd[0]} sizes the vllm backend; backend is {self.backend!r}")
        if self.backend == "vllm" and not self.tasks:
            raise ValueError("backend 'vllm' runs the lm-eval tasks, and tasks is empty")
        if self.recovery_threshold is not None and not 0 < self.recovery_threshold <= 1:
            raise ValueError(f"recovery_threshold must be in (0, 1], got {self.recovery_threshold}")
        if self.sink_check is not None and not 0 < self.sink_check <= 1:
            raise ValueError(f"sink_check must be in (0, 1] (a fraction of the baseline's), got {self.sink_check}")
        if not self.perplexity and not self.tasks:
            raise ValueError("perplexity is false and tasks is empty: nothing to measure")


@dataclass(frozen=True)
class ExportStage:
    model_card: bool = True
    # export format of the quantize stage's result (it becomes QuantConfig.format): compressed-tensors
    # (the default of rtn and gptq) | dequantized; bnb has its own
    format: str | None = None

    def __post_init__(self):
        from ..quant.backends import BACKENDS, FORMATS

        known = list(dict.fromkeys([*FORMATS, *(b.own_format for b in BACKENDS.values() if b.own_format)]))
        if self.format is not None and self.format not in known:
            raise ValueError(f"format must be one of {', '.join(known)}, got {self.format!r}")


@dataclass(frozen=True)
class PushStage:
    repo_id: str
    private: bool = True
    commit_message: str = "Upload compressed model (secompress)"


@dataclass(frozen=True)
class StageSpec:
    """How a stage's YAML mapping becomes its config: the keys the recipe may set, and the
    fields the ``data`` / ``model`` sections fill (recipe key -> config field)."""

    cls: type
    from_data: dict = field(default_factory=dict)  # config field -> data/model attribute (or a constant)
    inline: tuple[str, type] | None = None  # a nested config whose keys sit in the stage's mapping


STAGES: dict[str, StageSpec] = {
    "profile": StageSpec(ProfileConfig, {"num_samples": "data.num_samples", "seq_len": "data.seq_len",
                                         "batch_size": "data.batch_size", "dtype": "model.dtype"}, ("rule", SERule)),
    "prune": StageSpec(PruneConfig, {"calib_samples": "data.num_samples", "seq_len": "data.seq_len",
                                     "batch_size": "data.batch_size", "eval_samples": 0}),
    "quantize": StageSpec(QuantConfig, {"format": None}),  # format: from the export stage (export.format)
    "evaluate": StageSpec(EvaluateStage),
    "export": StageSpec(ExportStage),
    "push": StageSpec(PushStage),
}
ORDER = list(STAGES)  # stages must appear in this order (each may be left out)


@dataclass(frozen=True)
class Recipe:
    version: int
    name: str
    model: ModelSpec
    data: DataSpec = DataSpec()
    stages: tuple[tuple[str, Any], ...] = ()
    source: str = "<recipe>"
    lines: dict = field(default_factory=dict, compare=False, repr=False)  # dotted key -> "file:line"

    def stage(self, name: str):
        return next((cfg for n, cfg in self.stages if n == name), None)

    @property
    def stage_names(self) -> list[str]:
        return [n for n, _ in self.stages]

    def at(self, key: str) -> str:
        """``file:line: key`` of a dotted key (the nearest enclosing key with a line)."""
        k = key
        while k and k not in self.lines:
            k = k.rpartition(".")[0]
        return f"{self.lines.get(k, self.source)}: {key}"


# ---- parsing with line numbers ------------------------------------------------------------

def _where(src: str, node) -> str:
    return f"{src}:{node.start_mark.line + 1}" if getattr(node, "start_mark", None) is not None else src


def _value(node, src: str, path: str):
    """The Python value of a YAML node, safe types only (a ``!!python/...`` tag is an error)."""
    import yaml

    try:
        return yaml.safe_load(yaml.serialize(node))
    except (yaml.YAMLError, RecursionError) as e:
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecipeError(f"{_where(src, node)}: {path}: not a plain YAML value ({what})") from None


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
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise RecipeError(f"{at}: {path}: must be a list, got {type(value).__name__}")
        out = [_check_type(v, get_args(hint)[0], f"{path}[{i}]", at) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if hint is Rule:
        value = _check_type(value, str, path, at)
        try:
            return Rule.parse(value)
        except ValueError as e:
            raise RecipeError(f"{at}: {path}: {e}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise RecipeError(f"{at}: {path}: must be {hint.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _mapping(node, src: str, path: str):
    import yaml

    if node is None or (isinstance(node, yaml.ScalarNode) and node.value in ("", "null", "~")):
        return yaml.MappingNode("tag:yaml.org,2002:map", [])
    if not isinstance(node, yaml.MappingNode):
        raise RecipeError(f"{_where(src, node)}: {path}: must be a mapping")
    return node


def _blame(e: Exception, given: dict[str, str], fallback: str) -> str:
    """The ``file:line: key`` a config's error is about: the given key its message names first."""
    msg = str(e)
    hits = [(m.start(), k) for k in given for m in [re.search(rf"\b{re.escape(k)}\b", msg)] if m]
    return given[min(hits)[1]] if hits else fallback


def _build(cls, node, src: str, path: str, lines: dict, fixed: dict | None = None,
           inline: tuple[str, type] | None = None, fixed_at: dict[str, str] | None = None):
    """``cls(**mapping)`` from a YAML mapping node, each value type-checked against the field's hint.
    ``fixed_at``: field -> ``file:line: key`` of a fixed value set elsewhere (blamed for its errors)."""
    node = _mapping(node, src, path)
    hints = get_type_hints(cls)
    fixed = fixed or {}
    names = [f.name for f in fields(cls) if f.name not in fixed and (inline is None or f.name != inline[0])]
    sub_names = [f.name for f in fields(inline[1])] if inline else []
    sub_hints = get_type_hints(inline[1]) if inline else {}
    kwargs: dict[str, Any] = {}
    sub: dict[str, Any] = {}
    given: dict[str, str] = {}
    nodes: dict[str, Any] = {}
    lines[path] = _where(src, node)
    blame = dict(fixed_at or {})
    for k_node, v_node in node.value:
        key = k_node.value
        if key in given:
            raise RecipeError(f"{_where(src, k_node)}: {path}.{key}: given twice")
        if key not in names and key not in sub_names:
            raise RecipeError(f"{_where(src, k_node)}: unknown key '{key}' in '{path}' "
                              f"(allowed: {', '.join(sorted(names + sub_names))})")
        at = _where(src, v_node)
        given[key], nodes[key], lines[f"{path}.{key}"] = f"{at}: {path}.{key}", v_node, at
        if cls is QuantConfig and key == "options":
            continue  # built below, once the method (and so the options class) is known
        target, hint = (sub, sub_hints[key]) if key in sub_names else (kwargs, hints[key])
        target[key] = _check_type(_value(v_node, src, f"{path}.{key}"), hint, f"{path}.{key}", at)
    try:
        if inline and sub:
            kwargs[inline[0]] = inline[1](**sub)
        if "options" in nodes:
            backend = backend_for(kwargs.get("method", "rtn"), kwargs.get("scheme"))
            kwargs["options"] = _build(backend.options, nodes["options"], src, f"{path}.options", lines)
        missing = [f.name for f in fields(cls) if f.name not in kwargs and f.name not in fixed
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise RecipeError(f"{_where(src, node)}: {path}: needs {', '.join(missing)}")
        return cls(**kwargs, **fixed)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{_blame(e, {**given, **blame}, f'{_where(src, node)}: {path}')}: {e}") from None


def _compose(text: str, source: str):
    import yaml

    try:
        return yaml.compose(text)
    except (yaml.YAMLError, RecursionError) as e:
        what = str(e).splitlines()[0] if isinstance(e, yaml.YAMLError) and str(e) else "nested too deeply"
        raise RecipeError(f"{source}: not valid YAML: {what}") from None


def parse_recipe(text: str, source: str = "<recipe>", overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Parse and validate a recipe's YAML text; ``overrides`` are ``dotted.key=value`` strings."""
    import yaml

    root = _compose(text, source)
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
    version = _value(top["version"][1], source, "version")
    if version != SCHEMA_VERSION:
        raise RecipeError(f"{_where(source, top['version'][1])}: recipe version {version!r} is not supported "
                          f"(this secompress reads version {SCHEMA_VERSION})")
    name = _check_type(_value(top["name"][1], source, "name"), str, "name", _where(source, top["name"][1]))
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise RecipeError(f"{_where(source, top['name'][1])}: 'name' must be one plain folder name (letters, digits, "
                          f"'.', '_', '-'; no '/' or '..'), got {name!r}: it names the output folder")
    lines: dict[str, str] = {}
    model = _build(ModelSpec, top["model"][1], source, "model", lines)
    data = _build(DataSpec, top["data"][1], source, "data", lines) if "data" in top else DataSpec()
    stages = _parse_stages(top.get("stages", (None, None))[1], source, model, data, lines)
    recipe = Recipe(version, name, model, data, tuple(stages), source, lines)
    if "push" in recipe.stage_names and "export" not in recipe.stage_names:
        raise RecipeError(f"{recipe.at('stages.push')}: stage 'push' needs an 'export' stage before it")
    return recipe


def _parse_stages(node, src: str, model: ModelSpec, data: DataSpec, lines: dict) -> list[tuple[str, Any]]:
    import yaml

    if node is None or not isinstance(node, yaml.SequenceNode) or not node.value:
        raise RecipeError(f"{src}: 'stages' must be a non-empty list such as [profile: {{}}, export: {{}}]")
    sections = {"data": data, "model": model}
    out: list[tuple[str, Any]] = []
    last = -1
    deferred = None  # the quantize stage: built once the export stage's format is known
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
        spec = STAGES[name]
        fixed = {f: (getattr(sections[v.split(".")[0]], v.split(".")[1]) if isinstance(v, str) else v)
                 for f, v in spec.from_data.items()}
        lines[f"stages.{name}"] = _where(src, k_node)
        if name == "quantize":
            deferred = (len(out), v_node, fixed)
            out.append((name, None))
            continue
        out.append((name, _build(spec.cls, v_node, src, f"stages.{name}", lines, fixed, spec.inline)))
    export = next((cfg for n, cfg in out if n == "export"), None)
    fmt = None if export is None else export.format
    if deferred is not None:  # QuantConfig.format is the export stage's `format` (one spelling, one place)
        i, v_node, fixed = deferred
        at = {"format": f"{lines['stages.export.format']}: stages.export.format"} if fmt is not None else {}
        out[i] = ("quantize", _build(QuantConfig, v_node, src, "stages.quantize", lines, {**fixed, "format": fmt},
                                     fixed_at=at))
    elif fmt is not None:
        raise RecipeError(f"{lines['stages.export.format']}: stages.export.format: applies to a quantize stage's "
                          "result; this recipe has none")
    return out


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
            new = _compose(value, f"override {override[:60]!r}") or yaml.ScalarNode("tag:yaml.org,2002:null", "null")
            _value(new, f"override {override[:60]!r}", path)  # a !!python/... tag is named as the override's
            pairs = [(k, v) for k, v in node.value if k.value != key]
            node.value = pairs + [(yaml.ScalarNode("tag:yaml.org,2002:str", key, start_mark=root.start_mark), new)]
            if new.start_mark is None:
                new.start_mark = root.start_mark
            return root
        if child is None:
            raise RecipeError(f"override '{override}': no key '{key}'")
        node = child
    return root


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe '{path}' does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})")
    return parse_recipe(text, str(p), list(overrides))


def check_against_checkpoint(recipe: Recipe) -> None:
    """Refuse (RecipeError with file:line: key) what a local checkpoint's config.json refutes, reading no
    weight: ``model.model_type``, a prune ratio the router cannot take, quantization rules and group
    sizes that do not fit the weights (checked on a meta-device skeleton). A hub id is checked by
    ``model.model_type`` alone (its adapter), as the config is not fetched here."""
    import json

    from transformers import AutoConfig

    from ..adapters import get_adapter

    m = recipe.model
    cfg_file = Path(m.id) / "config.json"
    if not cfg_file.is_file():
        if m.model_type is not None:
            try:
                get_adapter(AutoConfig.for_model(m.model_type))
            except (ValueError, KeyError, SecompressError) as e:
                raise RecipeError(f"{recipe.at('model.model_type')}: {e}") from None
        return
    config = AutoConfig.from_pretrained(str(m.id), trust_remote_code=m.trust_remote_code)
    get_adapter(config)  # UnsupportedModelError naming the supported types
    found = json.loads(cfg_file.read_text()).get("model_type")
    if m.model_type is not None and m.model_type != found:
        raise RecipeError(f"{recipe.at('model.model_type')}: '{m.model_type}' but {cfg_file} says '{found}'")
    from ..prune.api import plan_for
    from ..quant.plan import resolve_plan
    from ..streaming import build_skeleton

    skeleton = build_skeleton(config)  # parameters on the meta device: nothing is read
    if (pr := recipe.stage("prune")) is not None:
        try:
            plan_for(skeleton, pr.ratio, pr.method)  # a merge below top_k, a HEAPr width below 1
        except (ValueError, SecompressError) as e:
            raise RecipeError(f"{recipe.at('stages.prune.ratio')}: {e}") from None
    if (q := recipe.stage("quantize")) is not None:
        if q.scheme is not None:
            try:  # group / block sizes, vLLM's kernel rules, an FP8 checkpoint given an FP8 scheme
                q.check_model(skeleton, config)
            except (ValueError, SecompressError) as e:
                raise RecipeError(f"{recipe.at('stages.quantize.scheme')}: {e}") from None
        try:
            plan = resolve_plan(skeleton, q.rules, (), q.se_mode, q.se_bits, q.bits, {"method": q.method})
            q.backend.check_plan(plan, q)
        except (ValueError, SecompressError) as e:
            key = "group_size" if "group_size" in str(e) else "rules" if "rule" in str(e) else "bits"
            raise RecipeError(f"{recipe.at(f'stages.quantize.{key}')}: {e}") from None
