"""Whole routed experts of a mixture of experts (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE): how many
each layer keeps, one count for every layer where the config states one (`num_local_experts` or
`num_experts`).

Expert e of a layer is slice e of every parameter of its experts module (`gate_up_proj`,
`down_proj`, biases where the class has them: `experts`) and of its router (the sibling module
whose `weight` has one row an expert and that picks each token's `top_k` by a softmax over the
rows). Removing expert e routes exactly as a logit of −∞ for it would: the softmax gives it
nothing, top-k never picks it, and the others get the probabilities the softmax over the rest
gives them.

An expert's score is the OBA unit score (Sun et al., ICLR 2025): |signed sum| of the element
scores over all its parameters (the L2 norm of its weights for magnitude). A layer keeps at least
`top_k` experts: its units are its experts from the least important on, all but its `top_k` − 1
best, so the one unit the allocation never removes leaves `top_k`.

What removing one saves: its parameters (3 × hidden × I, and a router row); in MACs only its
router row's, as every token still runs `top_k` experts. So only a parameter target is offered
whole experts (`offered`).
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine.experts import Experts, expert_layers
from worker.engine.groups import ChannelGroup, reduce_rows
from worker.engine.ranked import rank_rows, take_ranks

ExpertCountRemovals = list[tuple[str, list[int]]]  # (experts module name, experts removed)
NeuronRemovals = list[tuple[str, list[list[int]]]]  # (experts module name, each one's neurons)


def offered(target_metric: str) -> bool:
    """Whether removing whole experts moves `target_metric` (a token runs `top_k` experts
    however many there are: its MACs stay)."""
    return target_metric == "params"


@dataclass(eq=False)
class ExpertCount:
    experts: Experts
    router: Any  # weight (experts, hidden), top_k, num_experts
    # the experts from least to most important as last scored, as one row (`ranked`)
    order: Tensor = field(default_factory=lambda: torch.empty(1, 0, dtype=torch.long))

    @property
    def count(self) -> int:
        return self.experts.count

    @property
    def removable(self) -> int:
        """Units: every expert but the `top_k` − 1 most important."""
        return self.count - int(self.router.top_k) + 1

    def channel_group(self, name: str) -> ChannelGroup:
        """Root channel r: the r-th least important expert (scored by `rank_`)."""
        return ChannelGroup(
            name, self.router, None, self.removable, 1, [], 1, self.rank_, self.costs
        )

    def rank_(self, element_scores: dict[nn.Parameter, Tensor], method: str) -> Tensor:
        """The `removable` lowest expert scores, ascending; remembers the order for `remove_`."""
        per_expert = torch.zeros(self.count, dtype=torch.float64)
        for parameter in self._parameters():
            if parameter in element_scores:
                rows = element_scores[parameter].double().reshape(self.count, -1).cpu()
                per_expert += reduce_rows(rows, method)  # squares for magnitude
        per_expert = per_expert.sqrt() if method == "magnitude" else per_expert.abs()
        scores, self.order = rank_rows(per_expert.unsqueeze(0))
        return scores[: self.removable]

    def costs(self, module_macs: Mapping[nn.Module, int], metric: str) -> Tensor:
        """What removing one expert saves: its router row's MACs, or its parameters."""
        if metric == "macs":
            saved = module_macs.get(self.router, 0) / self.count
        else:
            saved = sum(p[0].numel() for p in self._parameters())
        return torch.full((self.removable,), float(saved), dtype=torch.float64)

    def remove_(self, ranks: list[int]) -> list[int]:
        """Remove the experts of ranks `ranks`; returns them (indices among the current ones),
        for the plan."""
        [removed], self.order = take_ranks(self.order, ranks)
        self.remove_experts_(removed)
        return removed

    def remove_experts_(self, removed: list[int]) -> None:
        """Remove experts `removed` from the experts module and the router."""
        count, dropped = self.count, set(removed)
        kept = torch.tensor([e for e in range(count) if e not in dropped], dtype=torch.long)
        for module in (self.experts.module, self.router):
            for name, parameter in list(module.named_parameters(recurse=False)):
                if parameter.shape[0] == count:
                    index = kept.to(parameter.device)
                    narrowed = parameter.data.index_select(0, index).clone()
                    setattr(module, name, nn.Parameter(narrowed, parameter.requires_grad))
            if isinstance(getattr(module, "num_experts", None), int):
                module.num_experts = len(kept)  # the forward's one_hot and histc read it
        if self.experts.order.shape[0] == count:  # each expert's neurons, as last scored
            self.experts.order = self.experts.order[kept]

    def _parameters(self) -> list[nn.Parameter]:
        """Every parameter with one slice an expert: the experts module's and the router's."""
        modules = (self.experts.module, self.router)
        return [
            p
            for module in modules
            for p in module.parameters(recurse=False)
            if p.dim() and p.shape[0] == self.count
        ]


def expert_counts(model: nn.Module, layers: Iterable[Experts] | None = None) -> list[ExpertCount]:
    """Every layer of routed experts (`layers`, else `expert_layers`) with its router, the
    sibling module whose `weight` has one row an expert and that picks `top_k` of them."""
    by_module = {e.module: e for e in (expert_layers(model) if layers is None else layers)}
    found = []
    for parent in model.modules():
        children = list(parent.children())
        for experts in (by_module[c] for c in children if c in by_module):
            routers = [c for c in children if _routes(c, experts.count)]
            if len(routers) == 1:
                found.append(ExpertCount(experts, routers[0]))
    return found


def _routes(module: nn.Module, count: int) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and weight.shape[0] == count
        and isinstance(getattr(module, "top_k", None), int)
    )


def neurons_of_kept_experts(
    neuron_removals: NeuronRemovals, count_removals: ExpertCountRemovals
) -> NeuronRemovals:
    """Each expert's removed neurons (`experts.Experts.remove_`) as they read once
    `count_removals` (in order, on the experts the neuron removals index) are made first: a
    removed expert's row goes, the others keep theirs. A plan replays whole experts first."""
    rewritten = []
    for name, per_expert in neuron_removals:
        rows = list(range(len(per_expert)))
        for removed_from, experts in count_removals:
            if removed_from == name:
                rows = [row for position, row in enumerate(rows) if position not in experts]
        rewritten.append((name, [per_expert[row] for row in rows]))
    return rewritten
