"""What secompress needs to know about one MoE architecture, as data.

An adapter names attributes; it holds no per-model logic. The generic accessors
below use those names, so a new architecture is one small file in this package
plus one line in the registry (``adapters/__init__.py``).

Layout assumed (transformers >= 5): ``model.model.layers[i].<moe_block>`` holds a
router ``<router>`` (``weight [E, H]``) and fused experts ``<experts>`` with
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (transposed for GPT-OSS),
optionally a dense shared expert ``<shared_expert>`` (an MLP with ``down_proj``).
Legend: E routed experts, H hidden size, I expert FFN size.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")  # the projections of one per-expert MLP (module names)


@dataclass(frozen=True)
class MoEAdapter:
    model_type: str  # config.model_type
    num_experts_key: str  # config attribute holding the routed-expert count
    top_k_key: str = "num_experts_per_tok"
    intermediate_key: str = "moe_intermediate_size"  # config attribute holding each routed expert's FFN width I
    moe_block: str = "mlp"  # attribute of a decoder layer
    router: str = "gate"  # attribute of the MoE block: weight [E, H]
    experts: str = "experts"  # attribute of the MoE block: fused 3D parameters
    shared_expert: str | None = None  # attribute of the MoE block: dense MLP with down_proj
    shared_expert_gate: str | None = None  # Qwen2-MoE: sigmoid gate on the shared expert
    # config key k where the shared expert's width is intermediate_key x k (DeepSeek's n_shared_experts)
    shared_width_multiplier_key: str | None = None
    router_per_expert: tuple[str, ...] = ()  # router tensors indexed by expert besides weight rows
    group_keys: tuple[str, str] | None = None  # (n_group, topk_group) for grouped routing
    min_experts_per_group: int = 1  # grouped routing: fewest experts a group may hold (its router's needs)
    # config keys a transformers-4 stack reads for the same value: {attribute: original json key}
    legacy_config_keys: tuple[tuple[str, str], ...] = ()
    # how checkpoints on disk name per-expert weights: <ckpt_block>.experts.<e>.<gate|up|down>.weight
    ckpt_block: str = "mlp"
    ckpt_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    ckpt_router: str | None = None  # router name on disk if it differs from `router`
    # the model's own checkpoints store experts fused (no per-expert keys a loader could map back)
    ckpt_fused_experts: bool = False
    layers_path: str = "model.layers"
    # stored tensors that are not part of the model, as data: decoder layers numbered from num_hidden_layers
    # on, as many as this config key says (DeepSeek-V3's multi-token-prediction layer); the loaders skip them
    extra_layers_key: str | None = None

    def __post_init__(self):
        if not self.model_type or not self.num_experts_key:
            raise ValueError("an adapter needs model_type and num_experts_key")
        if (self.shared_expert_gate is not None) and self.shared_expert is None:
            raise ValueError(f"{self.model_type}: shared_expert_gate without shared_expert")

    # ---- config ---------------------------------------------------------------
    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_key))

    def top_k(self, config) -> int:
        return int(getattr(config, self.top_k_key))

    def intermediate_size(self, config) -> int:
        return int(getattr(config, self.intermediate_key))

    # ---- modules ---------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def block_of(self, layer: nn.Module) -> nn.Module | None:
        """The layer's MoE block, or None for a dense layer (e.g. DeepSeek's first_k_dense_replace)."""
        block = getattr(layer, self.moe_block, None)
        return block if block is not None and hasattr(block, self.experts) else None

    def moe_layer_indices(self, model: nn.Module) -> list[int]:
        return [i for i, layer in enumerate(self.layers(model)) if self.block_of(layer) is not None]

    def experts_of(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts)

    def router_of(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router)

    def shared_of(self, block: nn.Module) -> nn.Module | None:
        return getattr(block, self.shared_expert) if self.shared_expert else None

    def block_path(self, layer_idx: int) -> str:
        return f"{self.layers_path}.{layer_idx}.{self.moe_block}"

    # ---- names on disk -----------------------------------------------------------
    def disk_name(self, rel: str) -> str:
        """Layer-relative name -> name on disk for renamed MoE blocks (e.g. Mixtral's block_sparse_moe)."""
        head = f"{self.moe_block}."
        if not rel.startswith(head):
            return rel
        rest = rel[len(head):]
        if self.ckpt_router and rest.startswith(f"{self.router}."):
            rest = self.ckpt_router + rest[len(self.router):]
        return f"{self.ckpt_block}.{rest}"

    def disk_key(self, name: str) -> str:
        """Model-tree tensor or module name (fused or per-expert layout) -> checkpoint name (transformers-4 layout)."""
        head = self.layers_path + "."
        if not name.startswith(head):
            return name
        idx, _, rest = name[len(head):].partition(".")
        pre = f"{head}{idx}."
        per = f"{self.moe_block}.{self.experts}.per_expert."
        if rest.startswith(per):
            e, proj, *suffix = rest[len(per):].split(".", 2)  # suffix: none for a module name
            ckpt_proj = self.ckpt_expert_names[EXPERT_PROJ.index(proj)]
            return ".".join([f"{pre}{self.ckpt_block}.{self.experts}.{e}.{ckpt_proj}", *suffix])
        return pre + self.disk_name(rest)
