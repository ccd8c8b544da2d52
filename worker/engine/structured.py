"""Iterative structured (channel / head / neuron) pruning to a MACs or parameter target.

Each step re-scores the model, ranks the units of every coupled group and removes the cheapest
ones until the step's target is met, measuring after each removal round so the final step lands
within about one unit of the target. The schedule of per-step targets follows OBA: exponential
(kept_i = target^(i/steps)) or linear.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine import architectures
from worker.engine.batchnorm import recalibrate_batchnorm_
from worker.engine.config import PruneConfig
from worker.engine.cost import Cost, measure, run_forward
from worker.engine.errors import InvalidConfig, UnsupportedModel
from worker.engine.graph import build_graph
from worker.engine.groups import (
    ChannelGroup,
    channel_costs,
    channel_scores,
    collect_groups,
    unit_view,
)
from worker.engine.plan import Plan
from worker.engine.scores import LossFn, parameter_scores

MAX_ROUNDS_PER_STEP = 25
MIN_EXACT_STEPS = 8  # fewer would make each uniform step too coarse


@dataclass(frozen=True)
class StepRecord:
    step: int
    macs: int
    params: int
    seconds_scoring: float
    seconds_pruning: float
    channels_removed: int
    widths: dict[str, int]  # output channels of each group's root layer, by module name


@dataclass
class _Candidate:
    value: float
    group: ChannelGroup
    units: list[int]
    saving: float


def prune_channels_(
    model: nn.Module,
    example_inputs: Any,
    calibration: list[Any],
    loss_fn: LossFn,
    config: PruneConfig,
    on_step: Callable[[StepRecord], None] | None = None,
) -> tuple[list[StepRecord], Plan]:
    """Prune `model` in place to `config.target` of its MACs or parameters.

    Returns one record per step and the plan that replays the pruning on the original model.
    """
    named = dict(model.named_modules())
    unknown = [name for name in config.ignored_layers if name not in named]
    if unknown:
        raise InvalidConfig(f"ignored layers not found in the model: {unknown}")
    names = {module: name for name, module in named.items()}
    layers, frozen = architectures.attention_layers(model, config.attention_heads)
    heads_describable = (
        not architectures.is_transformer(model)
        or config.global_ranking
        or architectures.config_describes_head_size(model)
    )
    if not (config.prune_heads and heads_describable):
        frozen += [p for layer in layers for p in layer.projections]
        layers = []
    ignored = [named[n] for n in config.ignored_layers]
    ignored += architectures.output_layers(model, example_inputs) + frozen
    graph = build_graph(model, example_inputs)
    describable = architectures.group_filter(model)
    prunable_roots: set[nn.Module] = set()

    def allowed(group: ChannelGroup) -> bool:
        # decided once on the unpruned model: widths and configs change as pruning goes on
        return group.root in prunable_roots

    head_dims = architectures.head_dims(layers)
    prunable_roots.update(
        g.root for g in collect_groups(graph, names, ignored, head_dims, describable)
    )
    initial = measure(model, example_inputs).metric(config.target_metric)
    initial_units: dict[nn.Module, int] = {}
    history: list[StepRecord] = []

    for step in range(1, config.steps + 1):
        goal = config.step_target(step) * initial
        started = time.perf_counter()
        scores = parameter_scores(
            model, calibration, loss_fn, config.method, seed=config.seed + step
        )
        by_param = {p: scores[n] for n, p in model.named_parameters() if n in scores}
        seconds_scoring = time.perf_counter() - started
        groups = collect_groups(graph, names, ignored, head_dims, allowed)
        unit_scores = {
            g.root: _normalised(unit_view(channel_scores(g, by_param, config.method), g))
            for g in groups
        }
        for group in groups:
            initial_units.setdefault(group.root, group.units)
        removed = 0
        for _ in range(MAX_ROUNDS_PER_STEP):
            cost = measure(model, example_inputs)
            excess = cost.metric(config.target_metric) - goal
            if excess <= 0:
                break
            chosen = _select(groups, unit_scores, cost, excess, initial_units, config)
            if not chosen:
                break
            removed += _remove_units(graph, chosen, unit_scores)
            architectures.sync_structure(model, layers)
            _check_forward(model, example_inputs, chosen, names)
            groups = collect_groups(graph, names, ignored, head_dims, allowed)
        if config.recalibrate_batchnorm:
            recalibrate_batchnorm_(model, calibration, loss_fn)
        if config.finetune is not None:
            config.finetune(model, step)
        final = measure(model, example_inputs)
        record = StepRecord(
            step,
            final.macs,
            final.params,
            seconds_scoring,
            time.perf_counter() - started - seconds_scoring,
            removed,
            {names[root]: graph.get_out_channels(root) for root in prunable_roots},
        )
        history.append(record)
        if on_step is not None:
            on_step(record)
    config_updates = architectures.sync_structure(model, layers)
    heads = {names[layer.owner]: layer.heads for layer in layers}
    return history, Plan(list(graph.pruning_history()), heads, config_updates)


def _check_forward(
    model: nn.Module, example_inputs: Any, chosen: list[_Candidate], names: dict[nn.Module, str]
) -> None:
    """Fail clearly when a removal broke the model, as when a model input feeds a residual add
    directly: the traced graph cannot see that coupling."""
    try:
        with torch.no_grad():
            run_forward(model, example_inputs)
    except RuntimeError as error:
        roots = sorted({names.get(c.group.root, "?") for c in chosen})
        raise UnsupportedModel(
            f"pruning the groups rooted at {roots} broke the forward pass ({error}); "
            "list those layers in ignored_layers"
        ) from error


def _normalised(scores: Tensor) -> Tensor:
    top = scores.max()
    return scores / top if top > 0 else scores


def _floor_units(
    group: ChannelGroup, initial_units: dict[nn.Module, int], config: PruneConfig
) -> int:
    return max(1, math.ceil(config.layer_floor * initial_units[group.root]))


def _chunks(group: ChannelGroup, order: list[int], config: PruneConfig) -> list[list[int]]:
    """Units in removal order, chunked so the kept channel count stays a multiple of round_to."""
    step = config.round_to if config.round_to and group.unit == 1 else 1
    first = group.width % step
    chunks = [order[:first]] if first else []
    chunks += [order[i : i + step] for i in range(first, len(order), step)]
    return chunks


def _candidates(
    group: ChannelGroup,
    scores: Tensor,
    cost: Cost,
    initial_units: dict[nn.Module, int],
    config: PruneConfig,
) -> list[_Candidate]:
    savings = unit_view(channel_costs(group, cost, config.target_metric), group)
    order = torch.argsort(scores, stable=True).tolist()
    removable = group.units - _floor_units(group, initial_units, config)
    out: list[_Candidate] = []
    taken = 0
    for chunk in _chunks(group, order, config):
        if taken + len(chunk) > removable:
            break
        taken += len(chunk)
        score = float(scores[chunk].sum())
        saving = float(savings[chunk].sum())
        value = score / saving if config.cost_aware and saving > 0 else score
        out.append(_Candidate(value, group, chunk, saving))
    return out


def _select(
    groups: list[ChannelGroup],
    unit_scores: dict[nn.Module, Tensor],
    cost: Cost,
    excess: float,
    initial_units: dict[nn.Module, int],
    config: PruneConfig,
) -> list[_Candidate]:
    """Candidates to remove so the predicted saving covers `excess`.

    Predicted savings add per-member costs, which overstates joint savings: the loop measures
    and comes back for more rather than overshooting.
    """
    per_group = [
        _candidates(g, unit_scores[g.root], cost, initial_units, config)
        for g in groups
        if g.root in unit_scores
    ]
    if config.global_ranking:
        ranked = sorted((c for cs in per_group for c in cs), key=lambda c: c.value)
        return _take_until(ranked, excess)
    # Uniform widths: every group gives up the same fraction of its initial units, in exact
    # steps of 1/gcd when the widths share a large enough divisor (a config then states the
    # kept widths exactly, e.g. a stage and its 4× inner layer), else rounded steps.
    initial = [initial_units[cs[0].group.root] for cs in per_group if cs]
    steps = math.gcd(*initial) if initial else 0
    if steps < MIN_EXACT_STEPS:
        steps = max(initial, default=0)
    previous: list[_Candidate] = []
    for depth in range(1, steps + 1):
        chosen = []
        for cs in per_group:
            if not cs:
                continue
            quota = round(depth * initial_units[cs[0].group.root] / steps)
            taken = 0
            for candidate in cs:
                if taken >= quota:
                    break
                chosen.append(candidate)
                taken += len(candidate.units)
            if taken < quota:  # a group reached its floor: all stop, widths stay proportional
                return previous
        if sum(c.saving for c in chosen) >= excess:
            return chosen
        previous = chosen
    return []


def _take_until(ranked: list[_Candidate], excess: float) -> list[_Candidate]:
    chosen, saved = [], 0.0
    for candidate in ranked:
        if saved >= excess:
            break
        chosen.append(candidate)
        saved += candidate.saving
    return chosen


def _remove_units(
    graph: Any, chosen: list[_Candidate], unit_scores: dict[nn.Module, Tensor]
) -> int:
    """Remove every chosen unit, one pruning call per group (indices shift after each call)."""
    by_group: dict[nn.Module, tuple[ChannelGroup, list[int]]] = {}
    for candidate in chosen:
        by_group.setdefault(candidate.group.root, (candidate.group, []))[1].extend(candidate.units)
    removed = 0
    for root, (group, units) in by_group.items():
        channels = [u * group.unit + j for u in units for j in range(group.unit)]
        graph.get_pruning_group(root, group.handler, channels).prune()
        keep = torch.ones(len(unit_scores[root]), dtype=torch.bool)
        keep[units] = False
        unit_scores[root] = unit_scores[root][keep]
        removed += len(channels)
    return removed
