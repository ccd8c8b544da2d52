"""Coupled channel groups from Torch-Pruning's dependency graph, and their scores and costs.

A group is every parameter slice that must go when one channel goes: a conv's filters and bias,
its BatchNorm, the next layer's input channels, residual partners. Attention projections form
one group per attention layer whose unit is a whole head (`head_dim` channels).

Group score, following OBA (Sun et al., ICLR 2025): per member, the signed sum of element scores
over each channel (bias included), absolute value, averaged over the Conv/Linear members (norm
layers excluded). The allocation's unit scoring (`allocation.py`) then normalises them within
the group and sums per unit. Scores arrive already averaged over batches; the sum over a channel
commutes with that mean, so this equals "signed sum per batch, mean over batches, absolute
value". A scorer registered with `reduction="abs"` sums |element score| instead (of the mean
over batches: not the same as summing per batch).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from worker.engine.cost import Cost
from worker.engine.scores import reduction


@dataclass
class ChannelGroup:
    """One prunable group, described by its root layer (whose output channels define it)."""

    name: str
    root: nn.Module
    handler: Any  # Torch-Pruning's out-channel pruning function for the root
    width: int  # current output channels of the root
    unit: int  # channels removed together: 1, or head_dim for attention heads
    members: list[tuple[nn.Module, bool, list[int], list[int]]]  # (module, is_out, idxs, root_idxs)
    multiple: int = 1  # kept units must stay a multiple of this (hidden size: of the heads)
    # Units whose channels are no layer's (routed experts: `experts`) score and cost
    # themselves: (element scores, method) → per root channel; (module MACs, metric) → same.
    scores: Callable[[dict[nn.Parameter, Tensor], str], Tensor] | None = None
    costs: Callable[[Mapping[nn.Module, int], str], Tensor] | None = None

    @property
    def units(self) -> int:
        return self.width // self.unit


def keep_channels_(linear: nn.Linear, axis: int, kept: list[int]) -> None:
    """Keep only output (axis 0) or input (axis 1) channels `kept` of `linear`: for the units
    the engine removes outside Torch-Pruning's graph."""
    index = torch.tensor(kept, dtype=torch.long, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(axis, index).clone())
    if axis == 0 and linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).clone())
    if axis == 0:
        linear.out_features = len(kept)
    else:
        linear.in_features = len(kept)


def is_conv1d_transposed(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def weight_axis(module: nn.Module, is_out: bool) -> int | None:
    """Axis of `module.weight` that holds output (or input) channels; None if not Conv/Linear."""
    if isinstance(module, nn.Linear):
        return 0 if is_out else 1
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups == module.in_channels == module.out_channels:  # depthwise
            return 0
        out_axis, in_axis = (1, 0) if module.transposed else (0, 1)
        return out_axis if is_out else in_axis
    if is_conv1d_transposed(module):
        return 1 if is_out else 0
    return None


def collect_groups(
    graph: tp.DependencyGraph,
    names: dict[nn.Module, str],
    ignored: list[nn.Module],
    head_dims: dict[nn.Module, int],
    allowed: Callable[[ChannelGroup], bool],
) -> list[ChannelGroup]:
    """Every prunable group of the current model; attention groups get a head-sized unit."""
    root_types = [nn.modules.conv._ConvNd, nn.Linear, *_custom_types(graph)]
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=root_types):
        candidate = channel_group(graph, group, names, head_dims)
        if candidate.width > candidate.unit and allowed(candidate):
            groups.append(candidate)
    return groups


def channel_group(
    graph: tp.DependencyGraph,
    group: Any,
    names: dict[nn.Module, str],
    head_dims: dict[nn.Module, int],
) -> ChannelGroup:
    """One of Torch-Pruning's groups as a `ChannelGroup` (attention: a head-sized unit)."""
    root = group[0].dep.target.module
    members = []
    unit = 1
    for item in group:
        module = item.dep.target.module
        if not isinstance(module, nn.Module):
            continue
        is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
        if is_out and module in head_dims:
            unit = max(unit, head_dims[module])
        members.append((module, is_out, list(item.idxs), list(item.root_idxs)))
    width = graph.get_out_channels(root)
    name = names.get(root, type(root).__name__)
    return ChannelGroup(name, root, group[0].dep.handler, width, unit, members)


def shrink_groups(
    groups: list[ChannelGroup], removed: Mapping[nn.Module, list[int]]
) -> list[ChannelGroup]:
    """The groups once root channels `removed[root]` of some of them are gone, without asking
    Torch-Pruning again (tracing every group anew cost a small BERT 1.2 ms a round).

    Each member axis a removal touched loses the positions those channels held there, and the
    positions after them move down: what a fresh `collect_groups` says (tested on every engine
    architecture). Concatenated inputs come out right too: a removal in one group shifts the
    positions another group holds on the same axis.
    """
    lost: dict[tuple[nn.Module, bool], set[int]] = {}
    for group in groups:
        dropped = set(removed.get(group.root, ()))
        if not dropped:
            continue
        for module, is_out, idxs, root_idxs in group.members:
            lost.setdefault((module, is_out), set()).update(
                i for i, r in zip(idxs, root_idxs, strict=True) if r in dropped
            )
    shrunk = []
    for group in groups:
        roots = set(removed.get(group.root, ()))
        root_map = _renumbering(roots, group.width) if roots else None
        members = []
        for module, is_out, idxs, root_idxs in group.members:
            gone = lost.get((module, is_out))
            if not gone and root_map is None:
                members.append((module, is_out, idxs, root_idxs))
                continue
            if gone == roots and idxs == root_idxs == list(range(len(idxs))):
                # the group's own plain members (most of them): what is left, renumbered
                left = list(range(len(idxs) - len(roots)))
                members.append((module, is_out, left, list(left)))
                continue
            position = _renumbering(gone or set(), max(idxs, default=-1) + 1)
            kept = [
                (position[i], r) for i, r in zip(idxs, root_idxs, strict=True) if position[i] >= 0
            ]
            new_roots = [r for _, r in kept] if root_map is None else [root_map[r] for _, r in kept]
            members.append((module, is_out, [i for i, _ in kept], new_roots))
        shrunk.append(replace(group, width=group.width - len(roots), members=members))
    return shrunk


def _renumbering(lost: set[int], size: int) -> list[int]:
    """Each position of range(size) once `lost` are gone: its new position, or -1 if lost."""
    mapping, shift = [], 0
    for position in range(size):
        if position in lost:
            mapping.append(-1)
            shift += 1
        else:
            mapping.append(position - shift)
    return mapping


def _custom_types(graph: tp.DependencyGraph) -> list[type]:
    return [t for t in graph.CUSTOMIZED_PRUNERS if isinstance(t, type)]


def channel_scores(
    group: ChannelGroup, element_scores: dict[nn.Parameter, Tensor], method: str
) -> Tensor:
    """|signed channel sum| per root channel, averaged over Conv/Linear members (float64).

    `magnitude` uses the L2 norm of the channel's weights instead of a signed sum; a scorer
    registered with `reduction="abs"`, the sum of |element score|.
    """
    if group.scores is not None:
        return group.scores(element_scores, method)
    total = torch.zeros(group.width, dtype=torch.float64)
    counted = 0
    for module, is_out, idxs, root_idxs in group.members:
        axis = weight_axis(module, is_out)
        weight = getattr(module, "weight", None)
        if axis is None or weight not in element_scores:
            continue
        per_channel = _per_channel(element_scores[weight], axis, module, is_out, method)
        bias = getattr(module, "bias", None)
        if is_out and isinstance(bias, nn.Parameter) and bias in element_scores:
            per_channel = per_channel + reduce_rows(element_scores[bias].reshape(-1, 1), method)
        if method == "magnitude":
            per_channel = per_channel.sqrt()
        values = per_channel.abs().cpu()[torch.tensor(idxs, dtype=torch.long)]
        total.scatter_add_(0, torch.tensor(root_idxs, dtype=torch.long), values)
        counted += 1
    return total / max(counted, 1)


def _per_channel(score: Tensor, axis: int, module: nn.Module, is_out: bool, method: str) -> Tensor:
    # (…, C, …) -> (C, rest) -> (C,)
    per_channel = reduce_rows(score.movedim(axis, 0).reshape(score.shape[axis], -1), method)
    groups = getattr(module, "groups", 1)
    if (
        not is_out
        and isinstance(module, nn.modules.conv._ConvNd)
        and 1 < groups < module.in_channels
    ):
        per_channel = per_channel.repeat(groups)  # grouped conv: weight holds in_channels / groups
    return per_channel


def reduce_rows(rows: Tensor, method: str) -> Tensor:
    """(C, rest) -> (C,): squares for magnitude (its L2 norm), else as the method's scorer was
    registered to reduce (`scores.Reduction`)."""
    if method == "magnitude":
        return (rows**2).sum(1)
    return rows.abs().sum(1) if reduction(method) == "abs" else rows.sum(1)


def channel_costs(group: ChannelGroup, cost: Cost, metric: str) -> Tensor:
    """MACs (or parameters) that removing each root channel saves, summed over members (float64).

    Additive per member, so it slightly overstates the joint saving of removing channels on both
    sides of one layer; the pruning loop measures and corrects.
    """
    if group.costs is not None:
        return group.costs(cost.module_macs, metric)
    total = torch.zeros(group.width, dtype=torch.float64)
    for module, is_out, idxs, root_idxs in group.members:
        per_channel = _member_cost(module, is_out, cost, metric)
        if per_channel == 0.0:
            continue
        total.scatter_add_(
            0,
            torch.tensor(root_idxs, dtype=torch.long),
            torch.full((len(idxs),), per_channel, dtype=torch.float64),
        )
    return total


def _member_cost(module: nn.Module, is_out: bool, cost: Cost, metric: str) -> float:
    axis = weight_axis(module, is_out)
    weight = getattr(module, "weight", None)
    if metric == "macs":
        if axis is None or not isinstance(weight, Tensor):
            return 0.0
        return cost.module_macs.get(module, 0) / weight.shape[axis]
    if axis is not None and isinstance(weight, Tensor):
        channels = weight.shape[axis]
        saved = weight.numel() / channels
        bias = getattr(module, "bias", None)
        if is_out and isinstance(bias, Tensor):
            saved += 1
        return saved
    # norms, scales: one entry per channel in each vector parameter
    return (
        float(sum(1 for p in module.parameters(recurse=False) if p.dim() == 1)) if is_out else 0.0
    )


def unit_view(per_channel: Tensor, group: ChannelGroup) -> Tensor:
    """Per-channel values summed per pruning unit: (width,) -> (width // unit,)."""
    return per_channel.view(group.units, group.unit).sum(1)
