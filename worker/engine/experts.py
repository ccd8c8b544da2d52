"""Routed experts of a mixture of experts (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE): each expert's
FFN width, pruned to one width for every expert, as the config states one
(`intermediate_size` or `moe_intermediate_size`).

transformers keeps a layer's experts as two 3-D parameters: `gate_up_proj` (experts, 2I, hidden)
— gate and up fused, chunked by the forward — and `down_proj` (experts, hidden, I). Neuron j of
expert e is rows j and I + j of `gate_up_proj[e]` and column j of `down_proj[e]`. Torch-Pruning
sees no layer there, so the unit is defined and removed here: unit r of a layer is the r-th
least important neuron of *every* expert (by the OBA channel score, within each expert), so
removing the k lowest units leaves each expert its I − k best neurons: one width for all.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine.groups import ChannelGroup
from worker.engine.ranked import rank_rows, take_ranks

# transformers runs experts with grouped matrix products (torch._grouped_mm), whose operands'
# strides must be multiples of 16 bytes: 8 neurons in half precision (4 in float32)
KEPT_MULTIPLE = 8


@dataclass(eq=False)
class Experts:
    module: Any  # the experts module: gate_up_proj, down_proj
    # order[e] lists expert e's neurons from least to most important, as last scored
    order: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def count(self) -> int:
        return int(self.module.gate_up_proj.shape[0])

    @property
    def width(self) -> int:
        return int(self.module.down_proj.shape[2])

    def channel_group(self, name: str) -> ChannelGroup:
        """Root channel r: the r-th ranked neuron of every expert (scored by `rank_`)."""
        return ChannelGroup(
            name, self.module, None, self.width, 1, [], KEPT_MULTIPLE, self.rank_, self.costs
        )

    def rank_(self, element_scores: dict[nn.Parameter, Tensor], method: str) -> Tensor:
        """Per rank r, the sum over experts of their r-th lowest neuron score; remembers each
        expert's order for `remove_`. A neuron's score is the OBA channel score: |signed sum|
        over its gate and up rows, and over its down column, averaged over the two."""
        gate_up, down = self.module.gate_up_proj, self.module.down_proj
        if gate_up not in element_scores or down not in element_scores:
            self.order = torch.arange(self.width).repeat(self.count, 1)
            return torch.zeros(self.width, dtype=torch.float64)
        width = self.width
        rows = _per_channel(element_scores[gate_up], method)  # (experts, 2I)
        columns = _per_channel(element_scores[down].transpose(1, 2), method)  # (experts, I)
        per_neuron = (rows[:, :width] + rows[:, width:] + columns) / 2
        scores, self.order = rank_rows(per_neuron)
        return scores

    def costs(self, module_macs: Mapping[nn.Module, int], metric: str) -> Tensor:
        """What removing one rank (a neuron from every expert) saves: the experts' MACs over
        their width, or 3 × hidden parameters an expert."""
        if metric == "macs":
            saved = module_macs.get(self.module, 0) / self.width
        else:
            saved = self.count * 3 * int(self.module.down_proj.shape[1])
        return torch.full((self.width,), float(saved), dtype=torch.float64)

    def remove_(self, ranks: list[int]) -> list[list[int]]:
        """Remove the neurons of ranks `ranks` from every expert; returns each expert's removed
        neurons (indices among its current ones), for the plan."""
        removed, self.order = take_ranks(self.order, ranks)
        self.remove_neurons_(removed)
        return removed

    def remove_neurons_(self, removed: list[list[int]]) -> None:
        """Remove `removed[e]` from expert e (the same count from each)."""
        width = self.width
        drops = [set(r) for r in removed]
        kept = [[j for j in range(width) if j not in drop] for drop in drops]
        index = torch.tensor(kept, dtype=torch.long, device=self.module.down_proj.device)
        rows = torch.cat([index, index + width], dim=1)  # gate half, then up half
        gate_up, down = self.module.gate_up_proj.data, self.module.down_proj.data
        self.module.gate_up_proj = nn.Parameter(
            gate_up.gather(1, rows.unsqueeze(2).expand(-1, -1, gate_up.shape[2])).clone()
        )
        self.module.down_proj = nn.Parameter(
            down.gather(2, index.unsqueeze(1).expand(-1, down.shape[1], -1)).clone()
        )
        if isinstance(getattr(self.module, "intermediate_dim", None), int):
            self.module.intermediate_dim = len(kept[0])


def expert_layers(model: nn.Module) -> list[Experts]:
    """Every module holding routed experts as 3-D `gate_up_proj` and `down_proj`."""
    found = []
    for module in model.modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if (
            isinstance(gate_up, nn.Parameter)
            and isinstance(down, nn.Parameter)
            and gate_up.dim() == down.dim() == 3
            and gate_up.shape[1] == 2 * down.shape[2]
        ):
            found.append(Experts(module))
    return found


def _per_channel(scores: Tensor, method: str) -> Tensor:
    """(experts, channels, rest) → (experts, channels), as `groups.channel_scores` reduces a
    layer's rows: |signed sum|, or the L2 norm for magnitude."""
    scores = scores.double()
    return (scores**2).sum(2).sqrt() if method == "magnitude" else scores.sum(2).abs()
