"""Iterative structured (channel / head / neuron) pruning to a MACs or parameter target.

Each step re-scores the model, ranks the units of every coupled group and removes the cheapest
ones until the step's target is met, measuring after each removal round so the final step lands
within about one unit of the target. Which units go in a round is the allocation rule's choice
(`allocation`, named by `PruneConfig.normalisation`). The schedule of per-step targets follows
OBA: exponential (kept_i = target^(i/steps)) or linear.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine import architectures
from worker.engine.allocation import MIN_EXACT_STEPS, Candidate, registered_allocation
from worker.engine.batchnorm import recalibrate_batchnorm_
from worker.engine.config import FinetuneFn, PruneConfig
from worker.engine.cost import Cost, measure
from worker.engine.derived_hidden import DerivedHidden, derived_hidden
from worker.engine.errors import InvalidConfig, UnsupportedModel
from worker.engine.expert_count import ExpertCount, expert_counts, neurons_of_kept_experts, offered
from worker.engine.experts import Experts, expert_layers
from worker.engine.families import family_of
from worker.engine.fused_ffn import FusedFfn, fused_ffn_layers
from worker.engine.graph import build_graph
from worker.engine.groups import (
    ChannelGroup,
    channel_costs,
    channel_scores,
    collect_groups,
    shrink_groups,
    unit_view,
    weight_axis,
)
from worker.engine.head_dims import HeadDims, head_dim_layers
from worker.engine.kv_groups import (
    GroupedAttention,
    grouped_attention_layers,
    kv_channel_group,
    remove_kv_groups_,
)
from worker.engine.plan import Plan
from worker.engine.results import StepRecord
from worker.engine.scores import LossFn, parameter_scores
from worker.engine.width_multiplier import MultipliedWidths

MAX_ROUNDS_PER_STEP = 25


def prune_channels_(
    model: nn.Module,
    example_inputs: Any,
    calibration: list[Any],
    loss_fn: LossFn,
    config: PruneConfig,
    on_step: Callable[[StepRecord], None] | None = None,
    final_goal: float | None = None,
    finetune: FinetuneFn | None = None,
    cost: Cost | None = None,
    guard: Callable[[float], None] | None = None,
) -> tuple[list[StepRecord], Plan]:
    """Prune `model` in place to `config.target` of its MACs or parameters (or to `final_goal`,
    an absolute value of the metric, when depth pruning took part of the way already). `cost`
    is the model's as it comes, when the caller measured it already; `guard` receives an upper
    bound of the reachable fraction before anything is scored (and may raise).

    Returns one record per step and the plan that replays the pruning on the original model.
    """
    structure, groups = _discover(model, example_inputs, config)
    first = cost or measure(model, example_inputs)
    # Uniform widths of a CNN whose config states one multiplier: the class's own widths
    multiplied = None
    if not config.global_ranking and architectures.states_width_multiplier(model):
        multiplied = MultipliedWidths(model, first, config.layer_floor)
    if guard is not None:  # the bound of uniform fractions says nothing of a class's rounding
        guard(1.0 if multiplied else reachable_bound(groups, first, config))
    inputs = (model, example_inputs, calibration, loss_fn, config, finetune)
    run = _Run(*inputs, structure, groups, current=first, multiplied=multiplied)
    initial = first.metric(config.target_metric)
    end = config.target * initial if final_goal is None else final_goal
    history: list[StepRecord] = []
    for step in range(1, config.steps + 1):
        record = run.step_(step, config.step_target(step, initial, end))
        history.append(record)
        if on_step is not None:
            on_step(record)
    structure.sync_()
    return history, structure.plan()


def _discover(
    model: nn.Module, example_inputs: Any, config: PruneConfig
) -> tuple["_Structure", list[ChannelGroup]]:
    """What width pruning may remove in `model` under `config`, and its groups as the model
    comes (all prunable, by definition)."""
    named = dict(model.named_modules())
    unknown = [name for name in config.ignored_layers if name not in named]
    if unknown:
        raise InvalidConfig(f"ignored layers not found in the model: {unknown}")
    layers, frozen = architectures.attention_layers(model, config.attention_heads)
    heads_describable = (
        not architectures.is_transformer(model)
        or config.global_ranking
        or architectures.config_describes_head_size(model)
    )
    outside = _outside_units(model, whole_experts=offered(config.target_metric))
    frozen += list(outside.fused)  # their two halves are coupled here, not by Torch-Pruning
    frozen += [p for h in outside.head_dims.values() for p in h.projections]  # one head size
    if not (config.prune_heads and heads_describable):
        frozen += [p for layer in layers for p in layer.projections]
        layers = []
        outside.kv_layers = {}
    ignored = [named[n] for n in config.ignored_layers]
    ignored += architectures.output_layers(model, example_inputs) + frozen
    graph = build_graph(model, example_inputs)
    names = {module: name for name, module in named.items()}
    hidden = prunes_hidden_size(model, example_inputs, config)
    if hidden and family_of(getattr(model, "config", None)).hidden_with_head_size:
        derived = derived_hidden(model, graph, names)
        hidden = derived is not None
        if derived is not None:  # no group of Torch-Pruning's holds the streams: they go
            outside.hidden = {derived.streams[0]: derived}  # with every head's size
            ignored += [a.projections[3] for a in derived.attentions]
    describable = architectures.group_filter(model, hidden, per_layer=config.global_ranking)
    structure = _Structure(
        model,
        graph,
        names,
        layers,
        outside,
        ignored,
        architectures.head_dims(layers),
        architectures.kept_multiple(model),
    )
    groups = structure.groups(describable)
    structure.prunable_roots.update(g.root for g in groups)
    return structure, groups


@dataclass
class _Outside:
    """Units outside Torch-Pruning's graph, by root, and their removals for the plan."""

    kv_layers: dict[nn.Module, GroupedAttention]
    fused: dict[nn.Module, FusedFfn]
    experts: dict[nn.Module, Experts]
    head_dims: dict[nn.Module, HeadDims]  # by q projection
    expert_counts: dict[nn.Module, ExpertCount]  # by router
    # the hidden size with every head's size, by its first stream's root (`derived_hidden`)
    hidden: dict[nn.Module, DerivedHidden] = field(default_factory=dict)
    kv_removals: list[tuple[str, list[int]]] = field(default_factory=list)
    ffn_removals: list[tuple[str, list[int]]] = field(default_factory=list)
    expert_removals: list[tuple[str, list[list[int]]]] = field(default_factory=list)
    expert_count_removals: list[tuple[str, list[int]]] = field(default_factory=list)
    head_dim_removals: list[tuple[str, list[list[int]]]] = field(default_factory=list)
    embedding_removals: list[tuple[str, list[int]]] = field(default_factory=list)

    def __contains__(self, root: nn.Module) -> bool:
        units = (
            self.kv_layers,
            self.fused,
            self.experts,
            self.expert_counts,
            self.head_dims,
            self.hidden,
        )
        return any(root in outside for outside in units)

    def remove_(self, root: nn.Module, units: list[int], names: dict[nn.Module, str]) -> None:
        if root in self.kv_layers:
            remove_kv_groups_(self.kv_layers[root], units)
            self.kv_removals.append((names[self.kv_layers[root].owner], units))
        elif root in self.fused:
            self.fused[root].remove_(units)
            self.ffn_removals.append((names[root], units))
        elif root in self.experts:
            self.expert_removals.append((names[root], self.experts[root].remove_(units)))
        elif root in self.expert_counts:
            count = self.expert_counts[root]
            experts_removed = (names[count.experts.module], count.remove_(units))
            self.expert_count_removals.append(experts_removed)
            # the plan replays whole experts first: neurons removed so far lose their rows
            self.expert_removals = neurons_of_kept_experts(self.expert_removals, [experts_removed])
        elif root in self.hidden:
            for attention, removed in self.hidden[root].remove_(units):
                self.head_dim_removals.append((names[attention.owner], removed))
            self.embedding_removals += [(names[e], units) for e in self.hidden[root].untraced]
        else:
            heads = self.head_dims[root]
            self.head_dim_removals.append((names[heads.owner], heads.remove_(units)))

    def width(self, root: nn.Module, graph: Any) -> int:
        """A root's output channels (an experts module's: each expert's width; a router's:
        its experts; a layer's heads': their size)."""
        if root in self.experts:
            return self.experts[root].width
        if root in self.expert_counts:
            return self.expert_counts[root].count
        if root in self.head_dims:
            return self.head_dims[root].head_dim
        if root in self.hidden:
            return self.hidden[root].width
        return int(graph.get_out_channels(root))


def _outside_units(model: nn.Module, whole_experts: bool) -> _Outside:
    """The units the engine removes itself, outside Torch-Pruning's graph: key/value heads of
    grouped-query attention, fused FFN neurons, experts' neurons, head dimensions (the last
    two where the config states their width) and, with `whole_experts`, routed experts where
    the config states their count."""
    kv_layers: dict[nn.Module, GroupedAttention] = {
        layer.k: layer for layer in grouped_attention_layers(model)
    }
    fused: dict[nn.Module, FusedFfn] = {f.up: f for f in fused_ffn_layers(model)}
    experts: dict[nn.Module, Experts] = {
        e.module: e for e in expert_layers(model) if architectures.states_expert_width(model)
    }
    head_dims: dict[nn.Module, HeadDims] = {
        h.projections[0]: h for h in head_dim_layers(model) if architectures.states_head_dim(model)
    }
    counts: dict[nn.Module, ExpertCount] = {}
    if whole_experts and architectures.states_expert_count(model):
        # the experts of their neurons' groups, whose order loses a removed expert's row
        counts = {c.router: c for c in expert_counts(model, list(experts.values()) or None)}
    return _Outside(kv_layers, fused, experts, head_dims, counts)


@dataclass
class _Structure:
    """What width pruning may remove in a model, found once on the model as it comes, and what
    it has written to the model's config so far."""

    model: nn.Module
    graph: Any  # Torch-Pruning's dependency graph, which records its own removals
    names: dict[nn.Module, str]
    layers: list[architectures.AttentionLayer]  # attention layers whose heads go whole
    outside: _Outside
    ignored: list[nn.Module]
    head_sizes: dict[nn.Module, int]
    multiple_of: Callable[[ChannelGroup], int]
    prunable_roots: set[nn.Module] = field(default_factory=set)
    config_updates: dict[str, Any] = field(default_factory=dict)  # each sync adds its changes

    def groups(self, keep: Callable[[ChannelGroup], bool]) -> list[ChannelGroup]:
        """Every group `keep` accepts, traced afresh."""
        names, outside = self.names, self.outside
        groups = collect_groups(self.graph, names, self.ignored, self.head_sizes, keep)
        for group in groups:
            group.multiple = self.multiple_of(group)
        kv = [kv_channel_group(layer, names[layer.owner]) for layer in outside.kv_layers.values()]
        ffn = [f.channel_group(names[up]) for up, f in outside.fused.items()]
        ffn += [e.channel_group(names[module]) for module, e in outside.experts.items()]
        ffn += [c.channel_group(names[router]) for router, c in outside.expert_counts.items()]
        ffn += [h.channel_group(names[h.owner]) for h in outside.head_dims.values()]
        ffn += [h.channel_group(names[root]) for root, h in outside.hidden.items()]
        return groups + [g for g in kv + ffn if g.width > g.unit and keep(g)]

    def prunable(self, group: ChannelGroup) -> bool:
        # decided once on the unpruned model: widths and configs change as pruning goes on
        return group.root in self.prunable_roots

    def sync_(self) -> None:
        """Write head counts and uniform widths into the model and its config."""
        grouped = self.outside.kv_layers.values()
        self.config_updates |= architectures.sync_structure(self.model, self.layers, grouped)

    def widths(self) -> dict[str, int]:
        """Each prunable root's output channels, by name."""
        return {self.names[r]: self.outside.width(r, self.graph) for r in self.prunable_roots}

    def plan(self) -> Plan:
        """The removals so far, to replay on the original model."""
        outside = self.outside
        return Plan(
            list(self.graph.pruning_history()),
            {self.names[layer.owner]: layer.heads for layer in self.layers},
            self.config_updates,
            outside.kv_removals,
            outside.ffn_removals,
            outside.expert_removals,
            head_dim_removals=outside.head_dim_removals,
            embedding_removals=outside.embedding_removals,
            expert_count_removals=outside.expert_count_removals,
        )


@dataclass
class _Run:
    """One width-pruning run: what it prunes with, and where it stands between rounds."""

    model: nn.Module
    example_inputs: Any
    calibration: list[Any]
    loss_fn: LossFn
    config: PruneConfig
    finetune: FinetuneFn | None
    structure: _Structure
    # Groups change only when units go: those of the unpruned model serve the first step, and
    # the last removal round's serve the next step.
    groups: list[ChannelGroup]
    # The model's cost as it is now, None after a removal until measured again. Recalibration
    # and fine-tuning change weights, not shapes: a step's last count is the next one's first.
    current: Cost | None
    multiplied: MultipliedWidths | None  # the class's own widths (`width_multiplier`)
    initial_units: dict[nn.Module, int] = field(default_factory=dict)

    def step_(self, step: int, goal: float) -> StepRecord:
        """Score, remove units until the cost meets `goal`, recalibrate, fine-tune."""
        started = time.perf_counter()
        losses: list[float] = []
        scores = parameter_scores(
            self.model,
            self.calibration,
            _recording(self.loss_fn, losses),
            self.config.method,
            seed=self.config.seed + step,
            theta_shortcut=self.config.theta_shortcut,
        )
        by_param = {p: scores[n] for n, p in self.model.named_parameters() if n in scores}
        seconds_scoring = time.perf_counter() - started
        unit_scores = {g.root: unit_scores_of(g, by_param, self.config) for g in self.groups}
        for group in self.groups:
            self.initial_units.setdefault(group.root, group.units)
        removed, current = self._remove_to_(goal, unit_scores)
        recalibrating = time.perf_counter()
        if self.config.recalibrate_batchnorm:
            recalibrate_batchnorm_(self.model, self.calibration, self.loss_fn)
        recalibrating = time.perf_counter() - recalibrating
        if self.finetune is not None:
            self.finetune(self.model, step)
        return StepRecord(
            step,
            current.macs,
            current.params,
            seconds_scoring,
            time.perf_counter() - started - seconds_scoring - recalibrating,
            removed,
            self.structure.widths(),
            recalibrating,
            sum(losses) / len(losses) if losses else None,
        )

    def _measured(self, chosen: list[Candidate]) -> Cost:
        return _measure_after(self.model, self.example_inputs, chosen, self.structure.names)

    def _remove_to_(self, goal: float, unit_scores: dict[nn.Module, Tensor]) -> tuple[int, Cost]:
        """Removal rounds until the measured cost meets `goal` or nothing more is chosen:
        the channels removed and the cost after."""
        structure, config = self.structure, self.config
        rule = registered_allocation(config.normalisation).rule
        removed = 0
        chosen: list[Candidate] = []
        for _ in range(MAX_ROUNDS_PER_STEP):
            self.current = self.current or self._measured(chosen)
            excess = self.current.metric(config.target_metric) - goal
            if excess <= 0:
                break
            if self.multiplied is None:
                chosen = rule(
                    self.groups, unit_scores, self.current, excess, self.initial_units, config
                )
            else:
                multiplier = self.multiplied.fit(goal, config.target_metric)
                widths = self.multiplied.widths(multiplier)
                chosen = _to_widths(
                    self.groups, unit_scores, widths, structure.names, self.current, config
                )
            if not chosen:
                break
            channels = _remove_units(
                structure.graph, chosen, unit_scores, structure.outside, structure.names
            )
            removed += sum(len(c) for c in channels.values())
            self.current = None
            structure.sync_()
            if self.multiplied is not None:
                structure.config_updates |= self.multiplied.write_(self.model, multiplier)
            self.groups = _regrouped(
                self.groups,
                channels,
                structure.outside,
                lambda: structure.groups(structure.prunable),
            )
        self.current = self.current or self._measured(chosen)
        return removed, self.current


def reachable_bound(groups: list[ChannelGroup], cost: Cost, config: PruneConfig) -> float:
    """An upper bound of the fraction of the MACs left once every group is as small as the
    floors, chunk multiples and uniform widths let it be (1 for a parameter target).

    Linear and convolution layers cost in proportion to their input times their output
    channels: each keeps at least its groups' kept shares of both. Everything else (attention
    products, norms) is counted as kept whole. It only decides whether the exact, costlier
    measurement (`prune.reachable_fraction`) is needed, so looseness costs time, not
    correctness: a job pruned short of its target fails `target_unreachable` anyway.
    """
    if config.target_metric != "macs" or not groups or cost.macs <= 0:
        return 1.0
    kept = {id(g): _kept_at_floor(g, config) for g in groups}
    if not config.global_ranking:  # all stop when the first group reaches its floor
        units = [g.units for g in groups]
        steps = math.gcd(*units)
        steps = steps if steps >= MIN_EXACT_STEPS else max(units)
        share = min(1.0, max(kept.values()) + 2 / steps)
        kept = dict.fromkeys(kept, share)
    removed: dict[tuple[nn.Module, bool], float] = {}
    for group in groups:
        for module, is_out, indices, _ in group.members:
            axis = weight_axis(module, is_out)
            weight = getattr(module, "weight", None)
            if axis is None or not isinstance(weight, Tensor) or _depthwise_input(module, is_out):
                continue
            share = len(indices) / weight.shape[axis] * (1 - kept[id(group)])
            removed[module, is_out] = removed.get((module, is_out), 0.0) + share
    saved = 0.0
    for module in {module for module, _ in removed}:
        left = (1 - min(1.0, removed.get((module, True), 0.0))) * (
            1 - min(1.0, removed.get((module, False), 0.0))
        )
        saved += cost.module_macs.get(module, 0) * (1 - left)
    return 1 - saved / cost.macs


def _kept_at_floor(group: ChannelGroup, config: PruneConfig) -> float:
    """The largest share of its units a group can be left with at its floor: the floor, plus
    what chunking to a multiple may keep above it."""
    step = math.lcm(config.round_to or 1, group.multiple) if group.unit == 1 else 1
    floor = max(1, math.ceil(config.layer_floor * group.units))
    return min(group.units, floor + step - 1) / group.units


def _depthwise_input(module: nn.Module, is_out: bool) -> bool:
    # a depthwise convolution's input channels are its output channels: counted once
    return (
        not is_out
        and isinstance(module, nn.modules.conv._ConvNd)
        and module.groups == module.in_channels == module.out_channels
    )


def _recording(loss_fn: LossFn, losses: list[float]) -> LossFn:
    """`loss_fn`, noting each value: a scoring pass's losses are the model's calibration loss,
    which the step reports without a forward pass of its own."""

    def recorded(model: nn.Module, batch: Any) -> Tensor:
        loss = loss_fn(model, batch)
        losses.append(float(loss.detach()))
        return loss

    return recorded


def prunes_hidden_size(model: nn.Module, example_inputs: Any, config: PruneConfig) -> bool:
    """Whether pruning under `config` takes the hidden size too (`hidden_size` None: where the
    model allows it); `InvalidConfig` where `hidden_size` asks for it and the model does not
    allow it."""
    if not architectures.is_transformer(model) or config.hidden_size is False:
        return False
    if config.global_ranking and family_of(getattr(model, "config", None)).hidden_with_head_size:
        if config.hidden_size:
            raise InvalidConfig(
                f"cannot prune the hidden size of {type(model).__name__} with global ranking: "
                "its heads go whole there, so their size and the hidden size stay"
            )
        return False
    problem = architectures.hidden_size_problem(model, example_inputs)
    if config.hidden_size and problem is not None:
        raise InvalidConfig(f"cannot prune the hidden size of {type(model).__name__}: {problem}")
    return problem is None


def _measure_after(
    model: nn.Module, example_inputs: Any, chosen: list[Candidate], names: dict[nn.Module, str]
) -> Cost:
    """The model's cost after removing `chosen`, whose forward pass is also the check that the
    removal left a working model: it fails clearly when not, as when a model input feeds a
    residual add directly (the traced graph cannot see that coupling)."""
    try:
        return measure(model, example_inputs)
    except RuntimeError as error:
        if not chosen:
            raise
        roots = sorted({names.get(c.group.root, "?") for c in chosen})
        raise UnsupportedModel(
            f"pruning the groups rooted at {roots} broke the forward pass ({error}); "
            "list those layers in ignored_layers"
        ) from error


def unit_scores_of(
    group: ChannelGroup, by_param: dict[nn.Parameter, Tensor], config: PruneConfig
) -> Tensor:
    """The values the group's units are ranked by, as the config's allocation rule makes them
    from the group's channel scores."""
    scoring = registered_allocation(config.normalisation).unit_scores
    return scoring(group, channel_scores(group, by_param, config.method))


def _to_widths(
    groups: list[ChannelGroup],
    unit_scores: dict[nn.Module, Tensor],
    widths: dict[str, int],
    names: dict[nn.Module, str],
    cost: Cost,
    config: PruneConfig,
) -> list[Candidate]:
    """In each group, its lowest-scored channels beyond `widths` of its root (by module name):
    the widths a class builds at a smaller multiplier (`width_multiplier`)."""
    chosen = []
    for group in groups:
        excess = group.width - widths.get(names[group.root], group.width)
        if excess <= 0 or group.unit != 1 or group.root not in unit_scores:
            continue
        scores = unit_scores[group.root]
        units = torch.argsort(scores, stable=True)[:excess]
        saving = unit_view(channel_costs(group, cost, config.target_metric), group)[units]
        chosen.append(
            Candidate(float(scores[units].sum()), group, units.tolist(), float(saving.sum()))
        )
    return chosen


def _remove_units(
    graph: Any,
    chosen: list[Candidate],
    unit_scores: dict[nn.Module, Tensor],
    outside: _Outside,
    names: dict[nn.Module, str],
) -> dict[nn.Module, list[int]]:
    """Remove every chosen unit, one pruning call per group (indices shift after each call);
    returns the root channels removed, by root.

    Key/value groups of grouped-query attention and fused FFN neurons are removed here and
    recorded for the plan; every other group goes through Torch-Pruning (which records its
    own history)."""
    by_group: dict[nn.Module, tuple[ChannelGroup, list[int]]] = {}
    for candidate in chosen:
        by_group.setdefault(candidate.group.root, (candidate.group, []))[1].extend(candidate.units)
    removed: dict[nn.Module, list[int]] = {}
    for root, (group, units) in by_group.items():
        channels = [u * group.unit + j for u in units for j in range(group.unit)]
        if root in outside:
            outside.remove_(root, sorted(units), names)
        else:
            graph.get_pruning_group(root, group.handler, channels).prune()
        keep = torch.ones(len(unit_scores[root]), dtype=torch.bool)
        keep[units] = False
        unit_scores[root] = unit_scores[root][keep]
        removed[root] = channels
    return removed


def _regrouped(
    groups: list[ChannelGroup],
    removed: dict[nn.Module, list[int]],
    outside: _Outside,
    collect: Callable[[], list[ChannelGroup]],
) -> list[ChannelGroup]:
    """The groups after a removal round: shrunk from the last ones, or collected anew after a
    key/value head removal (made outside Torch-Pruning's graph, which then regroups what
    it couples). A fused FFN's removal touches no group but its own: shrunk as the rest
    (collecting anew would trace through the fused layer's chunk, whose sizes the graph still
    holds from before, and Torch-Pruning does not come back from it)."""
    if any(root in outside.kv_layers for root in removed):
        return collect()
    return [g for g in shrink_groups(groups, removed) if g.width > g.unit]
