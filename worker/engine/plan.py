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
from worker.engine.errors import InvalidConfig
from worker.engine.graph import build_graph

PLAN_FORMAT = "apoptosis-pruning-plan/1"


@dataclass
class Plan:
    history: list[tuple[str, bool, list[int]]] = field(default_factory=list)
    heads: dict[str, int] = field(default_factory=dict)  # attention module name -> heads
    config_updates: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        if data.get("format") != PLAN_FORMAT:
            raise InvalidConfig(f"not a pruning plan of format {PLAN_FORMAT}")
        history = [
            (str(name), bool(out), [int(i) for i in idxs]) for name, out, idxs in data["history"]
        ]
        return cls(history, dict(data.get("heads", {})), dict(data.get("config_updates", {})))


def apply_plan_(model: nn.Module, example_inputs: Any, plan: Plan) -> nn.Module:
    """Prune `model` (the original architecture, any weights) in place to the plan's shapes."""
    if plan.history:
        graph = build_graph(model, example_inputs)
        graph.load_pruning_history([list(step) for step in plan.history])
    modules = dict(model.named_modules())
    for name, heads in plan.heads.items():
        owner: Any = modules[name]
        head_dim = getattr(owner, "attention_head_size", None) or getattr(owner, "head_dim", None)
        set_head_count(owner, heads, head_dim)
    config = getattr(model, "config", None)
    for key, value in plan.config_updates.items():
        if config is not None:
            setattr(config, key, value)
    return model
