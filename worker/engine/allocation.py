"""Allocation rules: how structured pruning spreads each round's removal over the groups.

`PruneConfig.normalisation` names the rule a run uses; `register_allocation` adds one. Once per
step, the rule's unit scoring turns each group's raw channel scores (`groups.channel_scores`)
into the values its units compete with; in each removal round of the step, the rule chooses the
units to remove so the predicted saving covers what is left above the step's goal. The two are
apart because the values are made once, on the step's fresh scores, while the rounds come back
for more as each removal is measured.

The built-in rules choose by `select_units` (one global ranking, or uniform widths) after
normalising channel scores within each group: `max` by the group's largest, `lamp` by LAMP's
layer-adaptive normaliser (Lee et al. 2021); `lamp_weights` takes each group's values from LAMP
on the weights' magnitudes and only their order from the scores (`lamp_weight_values`);
`lamp_rank_sum` the same values, in the order of the scores' rank plus the weights' rank.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from worker.engine.cost import Cost
from worker.engine.groups import ChannelGroup, channel_costs, channel_scores, unit_view

if TYPE_CHECKING:  # the config checks its allocation's name against this registry
    from worker.engine.config import PruneConfig

MIN_EXACT_STEPS = 8  # fewer would make each uniform step too coarse

# (group, its channel scores) → one value per unit, higher kept longer
UnitScoring = Callable[[ChannelGroup, Tensor], Tensor]


@dataclass
class Candidate:
    """Units of one group to remove together, the value they were ranked by and the metric
    (MACs or parameters) their removal is predicted to save."""

    value: float
    group: ChannelGroup
    units: list[int]
    saving: float


class AllocationRule(Protocol):
    """One removal round: the candidates to remove so their predicted saving covers `excess`
    (of `config.target_metric`, above the step's goal), leaving no group under its floor
    (`floor_units`). `unit_scores` holds each live group's unit values as the rule's unit
    scoring made them at the step's start, less the units removed since; `initial_units`,
    each group's units before pruning. Nothing chosen ends the step."""

    def __call__(
        self,
        groups: list[ChannelGroup],
        unit_scores: dict[nn.Module, Tensor],
        cost: Cost,
        excess: float,
        initial_units: dict[nn.Module, int],
        config: PruneConfig,
    ) -> list[Candidate]: ...


@dataclass(frozen=True)
class Allocation:
    """A registered allocation: its rule, and how it values units once per step."""

    rule: AllocationRule
    unit_scores: UnitScoring


_ALLOCATIONS: dict[str, Allocation] = {}


def max_normalised(group: ChannelGroup, channel_scores: Tensor) -> Tensor:
    """Channel scores over the group's largest, summed per unit.

    Normalising per channel (not per unit) keeps units of different sizes comparable: a head of
    head_dim channels competes with FFN neurons as the channels it holds. Normalising per unit
    made every layer's best head worth as much as its best neuron while costing head_dim times
    the MACs, and cost-aware ranking stripped heads to their floor (sentence embedder: held-out
    cosine 0.56 against 0.72 at half the MACs; docs/decisions/0006-channel-max-normaliser.md).
    For one-channel units (CNNs, FFN neurons, the hidden size) both are the same.
    """
    top = channel_scores.max()
    return unit_view(channel_scores / top if top > 0 else channel_scores, group)


def lamp_normalised(group: ChannelGroup, channel_scores: Tensor) -> Tensor:
    """Each channel score over the sum of the group's scores at least as large (the largest
    becomes 1; LAMP, Lee et al. 2021), summed per unit: removal spreads more evenly over the
    groups than under `max_normalised`."""
    order = torch.argsort(channel_scores)
    ranked = channel_scores[order]
    remaining = ranked.flip(0).cumsum(0).flip(0)
    out = torch.empty_like(channel_scores)
    out[order] = torch.where(remaining > 0, ranked / remaining, ranked)
    return unit_view(out, group)


def lamp_weight_values(group: ChannelGroup, scores: Tensor) -> Tensor:
    """LAMP's values on the weights' magnitudes (as Torch-Pruning's LAMP ranks), handed out to
    the group's units in the order of their channel `scores`: the lowest-scored unit gets the lowest
    value. How many units each group keeps is then LAMP's; which ones, the method's.

    Why: on the quality bench's 1-D CNN at half the MACs, every allocation of OBA's own scores
    thinned the first two layers and recovered worse after an epoch of fine-tuning than LAMP's
    widths (which keep them nearly whole), while LAMP's own choice of channels was the worst
    right after pruning (docs/benchmarks/quality.md). Groups that rank their own channels
    (`ChannelGroup.scores`: head dimensions, experts' neurons, a derived hidden size) remember
    the order they rank by, so they are valued by `lamp_normalised` of their scores instead."""
    if group.scores is not None:
        return lamp_normalised(group, scores)
    magnitudes = channel_scores(group, _magnitudes(group), "magnitude")
    order = torch.argsort(unit_view(scores, group), stable=True)
    return _handed_out(lamp_normalised(group, magnitudes), order)


def lamp_rank_sum_values(group: ChannelGroup, scores: Tensor) -> Tensor:
    """As `lamp_weight_values` (LAMP's widths from the weights' magnitudes), but the units are
    ordered by the rank of their score plus the rank of their weights' magnitude (ties: the
    lower score first): a channel goes when both call it small, not when one of them does.

    Why: within LAMP's widths, the scores' order alone was the best right after pruning and
    the magnitudes' order recovered as well after fine-tuning; with the sum of the two ranks
    the quality bench's CNNs were level with the best Torch-Pruning peer or ahead in all eight
    cells over 40 seeds, right after pruning and after an epoch of fine-tuning
    (docs/benchmarks/quality.md)."""
    if group.scores is not None:
        return lamp_normalised(group, scores)
    magnitudes = channel_scores(group, _magnitudes(group), "magnitude")
    by_score = _ranks(unit_view(scores, group))
    by_weight = _ranks(unit_view(magnitudes, group))
    order = torch.argsort((by_score + by_weight) * len(by_score) + by_score)
    return _handed_out(lamp_normalised(group, magnitudes), order)


def _ranks(values: Tensor) -> Tensor:
    """Each value's place from the lowest (0), ties in index order."""
    ranks = torch.empty(len(values), dtype=torch.long)
    ranks[torch.argsort(values, stable=True)] = torch.arange(len(values))
    return ranks


def _handed_out(values: Tensor, order: Tensor) -> Tensor:
    """`values` sorted and given out along `order`: the unit at order[0] gets the lowest."""
    out = torch.empty_like(values)
    out[order] = torch.sort(values, stable=True).values
    return out


def _magnitudes(group: ChannelGroup) -> dict[nn.Parameter, Tensor]:
    """|θ| of the weights and biases of the group's members: the `magnitude` method's scores."""
    found: dict[nn.Parameter, Tensor] = {}
    for module, *_ in group.members:
        for name in ("weight", "bias"):
            parameter = getattr(module, name, None)
            if isinstance(parameter, nn.Parameter):
                found[parameter] = parameter.detach().abs().double()
    return found


def register_allocation(
    name: str, rule: AllocationRule, *, unit_scores: UnitScoring = max_normalised
) -> None:
    """Make `name` an allocation (`PruneConfig.normalisation`): `rule` chooses each round's
    removals among units valued by `unit_scores` once per step."""
    _ALLOCATIONS[name] = Allocation(rule, unit_scores)


def allocation_names() -> tuple[str, ...]:
    """Every registered allocation: the built-ins first."""
    return tuple(_ALLOCATIONS)


def registered_allocation(name: str) -> Allocation:
    return _ALLOCATIONS[name]


def floor_units(
    group: ChannelGroup, initial_units: dict[nn.Module, int], config: PruneConfig
) -> int:
    """The fewest units the group may keep: `layer_floor` of its initial units, at least one."""
    return max(1, math.ceil(config.layer_floor * initial_units[group.root]))


def take_until(ranked: Iterable[Candidate], excess: float) -> list[Candidate]:
    """The first candidates whose savings add up to `excess` (all of them if they fall short)."""
    chosen, saved = [], 0.0
    for candidate in ranked:
        if saved >= excess:
            break
        chosen.append(candidate)
        saved += candidate.saving
    return chosen


def select_units(
    groups: list[ChannelGroup],
    unit_scores: dict[nn.Module, Tensor],
    cost: Cost,
    excess: float,
    initial_units: dict[nn.Module, int],
    config: PruneConfig,
) -> list[Candidate]:
    """Candidates to remove so the predicted saving covers `excess`.

    Predicted savings add per-member costs, which overstates joint savings: the loop measures
    and comes back for more rather than overshooting.
    """
    per_group = [
        found
        for g in groups
        if g.root in unit_scores
        if (found := _removable(g, unit_scores[g.root], cost, initial_units, config))
    ]
    if config.global_ranking:
        return take_until(_ranked(per_group), excess)
    return _uniform(per_group, excess, initial_units)


@dataclass
class _Removable:
    """One group's removable units in removal order, chunked so that kept widths stay
    multiples (`_chunks`), as running totals: whole-step selection then needs no object per
    unit (a Llama's FFN has thousands per layer)."""

    group: ChannelGroup
    chunks: list[list[int]]
    values: Tensor  # each chunk's score, per unit of saving when ranking is cost-aware
    taken: list[int]  # units removed once chunks[: i + 1] are
    saved: list[float]  # predicted saving once chunks[: i + 1] are

    def candidate(self, index: int) -> Candidate:
        saving = self.saved[index] - (self.saved[index - 1] if index else 0.0)
        return Candidate(float(self.values[index]), self.group, self.chunks[index], saving)

    def first(self, count: int) -> list[Candidate]:
        return [self.candidate(i) for i in range(count)]


def _removable(
    group: ChannelGroup,
    scores: Tensor,
    cost: Cost,
    initial_units: dict[nn.Module, int],
    config: PruneConfig,
) -> _Removable | None:
    savings = unit_view(channel_costs(group, cost, config.target_metric), group)
    order = torch.argsort(scores, stable=True)
    removable = group.units - floor_units(group, initial_units, config)
    chunks = _chunks(group, order.tolist(), config)
    taken = list(itertools.accumulate(len(chunk) for chunk in chunks))
    count = bisect.bisect_right(taken, removable)
    if not count:
        return None
    # Chunks are consecutive runs of `order`: their sums are differences of prefix sums.
    ends = torch.tensor(taken[:count])
    score_sums = _run_sums(scores[order].double(), ends)
    saving_sums = _run_sums(savings[order].double(), ends)
    values = score_sums
    if config.cost_aware:
        values = torch.where(saving_sums > 0, score_sums / saving_sums, score_sums)
    saved = saving_sums.cumsum(0).tolist()
    return _Removable(group, chunks[:count], values, taken[:count], saved)


def _chunks(group: ChannelGroup, order: list[int], config: PruneConfig) -> list[list[int]]:
    """Units in removal order, chunked so the kept channel count stays a multiple of round_to."""
    step = math.lcm(config.round_to or 1, group.multiple) if group.unit == 1 else 1
    first = group.width % step
    chunks = [order[:first]] if first else []
    chunks += [order[i : i + step] for i in range(first, len(order), step)]
    return chunks


def _run_sums(values: Tensor, ends: Tensor) -> Tensor:
    """Sums of values[0:ends[0]], values[ends[0]:ends[1]], …"""
    prefix = torch.cat([values.new_zeros(1), values.cumsum(0)])
    return prefix[ends] - prefix[torch.cat([ends.new_zeros(1), ends[:-1]])]


def _ranked(per_group: list[_Removable]) -> Iterator[Candidate]:
    """Every group's chunks by value, lowest first (ties: group order, then chunk order), made
    into candidates only as they are asked for."""
    if not per_group:
        return
    values = torch.cat([found.values for found in per_group])
    owner = torch.cat([torch.full((len(f.values),), i) for i, f in enumerate(per_group)])
    index = torch.cat([torch.arange(len(found.values)) for found in per_group])
    for position in torch.argsort(values, stable=True).tolist():
        yield per_group[int(owner[position])].candidate(int(index[position]))


def _uniform(
    per_group: list[_Removable], excess: float, initial_units: dict[nn.Module, int]
) -> list[Candidate]:
    """Uniform widths: every group gives up the same fraction of its initial units, in exact
    steps of 1/gcd when the widths share a large enough divisor (a config then states the
    kept widths exactly, e.g. a stage and its 4× inner layer), else rounded steps."""
    initial = [initial_units[r.group.root] for r in per_group]
    steps = math.gcd(*initial) if initial else 0
    if steps < MIN_EXACT_STEPS:
        steps = max(initial, default=0)

    def at(depth: int) -> tuple[list[int], float, bool]:
        """Chunks `depth` steps take from each group (chunks of a multiple never overshoot a
        group's quota), their saving, and whether a group ran out first."""
        counts: list[int] = []
        saving = 0.0
        for found in per_group:
            quota = round(depth * initial_units[found.group.root] / steps)
            count = bisect.bisect_right(found.taken, quota)
            if count == len(found.taken) and found.taken[-1] < quota:
                return counts, saving, True
            counts.append(count)
            saving += found.saved[count - 1] if count else 0.0
        return counts, saving, False

    # The first depth that saves enough or where a group reaches its floor (both only become
    # true as depth grows): a bisection, not a scan, since a wide FFN has hundreds of depths.
    def enough(depth: int) -> bool:
        _, saving, exhausted = at(depth)
        return exhausted or saving >= excess

    depth = bisect.bisect_left(range(steps + 1), True, lo=1, key=enough)
    if depth > steps:
        return []
    counts, _, exhausted = at(depth)
    if exhausted:
        counts = at(depth - 1)[0]
    return [c for found, n in zip(per_group, counts, strict=True) for c in found.first(n)]


register_allocation("max", select_units)
register_allocation("lamp", select_units, unit_scores=lamp_normalised)
register_allocation("lamp_weights", select_units, unit_scores=lamp_weight_values)
register_allocation("lamp_rank_sum", select_units, unit_scores=lamp_rank_sum_values)
ALLOCATIONS = allocation_names()  # the built-in rules
