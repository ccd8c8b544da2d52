"""Pruning plans: what structured pruning removed, as data, to rebuild the pruned module from the
original architecture (the `safetensors` + `pruning-plan.json` output).

A plan is Torch-Pruning's pruning history — (module name, output-or-input, removed indices),
in order — plus the attention head counts and config values the engine set. Replaying it on a
fresh copy of the original model gives the pruned shapes; loading the saved weights gives the
pruned model.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from worker.engine.architectures import set_head_count
from worker.engine.blocks import remove_blocks_
from worker.engine.derived_hidden import remove_embedding_channels_
from worker.engine.errors import InvalidConfig
from worker.engine.expert_count import expert_counts, neurons_of_kept_experts
from worker.engine.experts import expert_layers
from worker.engine.fused_ffn import fused_ffn_layers
from worker.engine.graph import build_graph
from worker.engine.head_dims import head_dim_layers
from worker.engine.kv_groups import grouped_attention_layers, remove_kv_groups_

PLAN_FORMAT = "apoptosis-pruning-plan/1"


@dataclass
class Plan:
    history: list[tuple[str, bool, list[int]]] = field(default_factory=list)
    heads: dict[str, int] = field(default_factory=dict)  # attention module name -> heads
    config_updates: dict[str, Any] = field(default_factory=dict)
    # grouped-query attention: (attention module name, kv heads removed), in order
    kv_removals: list[tuple[str, list[int]]] = field(default_factory=list)
    # fused gate-and-up FFNs: (fused projection name, neurons removed), in order
    ffn_removals: list[tuple[str, list[int]]] = field(default_factory=list)
    # routed experts: (experts module name, each expert's neurons removed), in order
    expert_removals: list[tuple[str, list[list[int]]]] = field(default_factory=list)
    # depth: the blocks' ModuleList and each removed block's position at its removal, in order
    block_container: str = ""
    blocks_removed: list[int] = field(default_factory=list)
    # every head's size (T5's d_kv): (attention module name, each head's dimensions removed)
    head_dim_removals: list[tuple[str, list[list[int]]]] = field(default_factory=list)
    # embeddings outside the traced graph that lose the hidden size's channels (BART's `shared`,
    # Whisper's encoder positions: `derived_hidden`): (embedding name, columns removed), in order
    embedding_removals: list[tuple[str, list[int]]] = field(default_factory=list)
    # whole routed experts: (experts module name, experts removed), in order; replayed before
    # `expert_removals`, whose rows are the experts kept (`expert_count`)
    expert_count_removals: list[tuple[str, list[int]]] = field(default_factory=list)

    def then(self, later: "Plan") -> "Plan":
        """This plan followed by `later`, a plan made on the model this one leaves: one plan
        from the original architecture (widths only: depth comes first in a plan)."""
        widths = (
            self.history
            or self.kv_removals
            or self.ffn_removals
            or self.expert_removals
            or self.head_dim_removals
            or self.embedding_removals
            or self.expert_count_removals
        )
        if later.blocks_removed and (widths or self.blocks_removed):
            raise InvalidConfig("a plan that removes blocks cannot follow another")
        return Plan(
            self.history + later.history,
            self.heads | later.heads,
            self.config_updates | later.config_updates,
            self.kv_removals + later.kv_removals,
            self.ffn_removals + later.ffn_removals,
            neurons_of_kept_experts(self.expert_removals, later.expert_count_removals)
            + later.expert_removals,
            later.block_container or self.block_container,
            self.blocks_removed + later.blocks_removed,
            self.head_dim_removals + later.head_dim_removals,
            self.embedding_removals + later.embedding_removals,
            self.expert_count_removals + later.expert_count_removals,
        )

    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        if data.get("format") != PLAN_FORMAT:
            raise InvalidConfig(f"not a pruning plan of format {PLAN_FORMAT}")
        history = [
            (str(name), bool(out), [int(i) for i in idxs]) for name, out, idxs in data["history"]
        ]
        kv_removals, ffn_removals, embedding_removals, expert_count_removals = (
            [(str(name), [int(u) for u in units]) for name, units in data.get(key, [])]
            for key in (
                "kv_removals",
                "ffn_removals",
                "embedding_removals",
                "expert_count_removals",
            )
        )
        expert_removals, head_dim_removals = (
            [
                (str(name), [[int(n) for n in each] for each in removed])
                for name, removed in data.get(key, [])
            ]
            for key in ("expert_removals", "head_dim_removals")
        )
        return cls(
            history,
            dict(data.get("heads", {})),
            dict(data.get("config_updates", {})),
            kv_removals,
            ffn_removals,
            expert_removals,
            str(data.get("block_container", "")),
            [int(i) for i in data.get("blocks_removed", [])],
            head_dim_removals,
            embedding_removals,
            expert_count_removals,
        )


def apply_plan_(model: nn.Module, example_inputs: Any, plan: Plan) -> nn.Module:
    """Prune `model` (the original architecture, any weights) in place to the plan's shapes."""
    for index in plan.blocks_removed:  # depth came first: the rest refers to the shorter model
        remove_blocks_(model, plan.block_container, [index])
    if plan.history:
        graph = build_graph(model, example_inputs)
        graph.load_pruning_history([list(step) for step in plan.history])
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    grouped = {names[layer.owner]: layer for layer in grouped_attention_layers(model)}
    for name, groups in plan.kv_removals:
        remove_kv_groups_(grouped[name], groups)
    fused = {names[f.up]: f for f in fused_ffn_layers(model)}
    for name, neurons in plan.ffn_removals:
        fused[name].remove_(neurons)
    experts = {names[e.module]: e for e in expert_layers(model)}
    counts = {names[c.experts.module]: c for c in expert_counts(model, experts.values())}
    for name, removed_experts in plan.expert_count_removals:
        counts[name].remove_experts_(removed_experts)
    for name, removed in plan.expert_removals:
        experts[name].remove_neurons_(removed)
    head_sizes = {names[h.owner]: h for h in head_dim_layers(model)}
    for name, removed in plan.head_dim_removals:
        head_sizes[name].remove_dims_(removed)
    for name, channels in plan.embedding_removals:
        remove_embedding_channels_(modules[name], channels)
    for name, heads in plan.heads.items():
        owner: Any = modules[name]
        head_dim = getattr(owner, "attention_head_size", None) or getattr(owner, "head_dim", None)
        set_head_count(owner, heads, head_dim)
    config = getattr(model, "config", None)
    for key, value in plan.config_updates.items():
        if config is not None:
            setattr(config, key, value)
    return model
