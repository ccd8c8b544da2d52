"""The engine's entry point: prune a model to a target, structured or not."""

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from worker.engine.architectures import unstated_widths
from worker.engine.config import FinetuneFn, PruneConfig
from worker.engine.cost import Cost, measure
from worker.engine.depth import prune_blocks_
from worker.engine.errors import InvalidConfig, TargetUnreachable
from worker.engine.modes import eval_mode
from worker.engine.plan import Plan
from worker.engine.results import PruneResult, StepRecord
from worker.engine.scores import LossFn, needs_data
from worker.engine.structured import prune_channels_
from worker.engine.unstructured import prune_2_4_, prune_unstructured_, sparsity


def prune_(
    model: nn.Module,
    example_inputs: Any,
    batches: Iterable[Any],
    loss_fn: LossFn,
    config: PruneConfig,
    on_step: Callable[[StepRecord], None] | None = None,
    finetune: FinetuneFn | None = None,
) -> PruneResult:
    """Prune `model` in place as `config` says (the trailing underscore, as in torchao's
    `quantize_`: the module passed in is the one changed).

    `example_inputs` (a tensor, a tuple of positional inputs or a dict of keyword inputs) traces
    the dependency graph and counts MACs. `batches` are the calibration data, passed as they are
    to `loss_fn(model, batch)`; they are iterated once per step, so a list is best. `on_step`
    receives each step's record as it completes (progress reporting); `finetune(model, step)`
    runs after each step's removal (channel and unstructured granularity).
    """
    calibration = list(batches)
    if not calibration and needs_data(config.method):
        raise InvalidConfig(f"method {config.method!r} needs at least one calibration batch")
    # Tracing and output detection run forward passes: in eval mode they leave BatchNorm
    # statistics alone. The caller's modes come back at the end.
    with eval_mode(model):
        before = measure(model, example_inputs)

        def refuse_unreachable(bound: float = 1.0) -> None:
            """Before anything is scored: a target under what the constraints allow is refused
            with the reachable value. Measuring that prunes a copy, so a target at or above
            an upper bound of it (width pruning works one out) is let through unmeasured."""
            if config.target >= bound:
                return
            reachable = reachable_fraction(model, example_inputs, config, before)
            if config.target < reachable:
                per_layer, why = None, None
                if not config.global_ranking:  # would other outputs get there?
                    free = replace(config, global_ranking=True)
                    per_layer = reachable_fraction(model, example_inputs, free, before)
                    if per_layer < reachable:
                        why = unstated_widths(model, example_inputs)
                raise TargetUnreachable(
                    config.target_metric, config.target, reachable, per_layer, why
                )

        guard = None
        if config.granularity == "channel" and not config.depth_share:
            guard = refuse_unreachable  # called by width pruning once its groups are known
        elif config.granularity in ("channel", "layer"):
            refuse_unreachable()
        return _prune(
            model, example_inputs, calibration, loss_fn, config, on_step, finetune, before, guard
        )


def _prune(
    model: nn.Module,
    example_inputs: Any,
    calibration: list[Any],
    loss_fn: LossFn,
    config: PruneConfig,
    on_step: Callable[[StepRecord], None] | None,
    finetune: FinetuneFn | None,
    before: Cost,
    guard: Callable[[float], None] | None = None,
) -> PruneResult:
    result = PruneResult(model, before.macs, before.params, before.macs, before.params, [])
    if config.granularity in ("channel", "layer"):
        result.history, result.plan = _prune_structure_(
            model, example_inputs, calibration, loss_fn, config, on_step, before, finetune, guard
        )
    elif config.granularity == "unstructured":
        result.masks, result.history = prune_unstructured_(
            model, example_inputs, calibration, loss_fn, config, on_step, finetune
        )
        result.sparsity = sparsity(model, result.masks)
    else:
        result.masks, result.dense_layers = prune_2_4_(model, calibration, loss_fn, config)
        result.sparsity = sparsity(model, result.masks)
    if config.granularity in ("channel", "layer") and result.history:
        # every structured step counts the model it leaves: the last count is the result's
        result.macs, result.params = result.history[-1].macs, result.history[-1].params
    else:
        after = measure(model, example_inputs)
        result.macs, result.params = after.macs, after.params
    if config.granularity in ("channel", "layer"):
        goal = config.target * before.metric(config.target_metric)
        reached = result.macs if config.target_metric == "macs" else result.params
        result.target_met = reached <= goal
    return result


def _prune_structure_(
    model: nn.Module,
    example_inputs: Any,
    calibration: list[Any],
    loss_fn: LossFn,
    config: PruneConfig,
    on_step: Callable[[StepRecord], None] | None,
    before: Cost,
    finetune: FinetuneFn | None = None,
    guard: Callable[[float], None] | None = None,
) -> tuple[list[StepRecord], Plan]:
    """Depth first (whole blocks, down to target^depth_share), then widths to the target."""
    initial = before.metric(config.target_metric)
    final = config.target * initial
    share = 1.0 if config.granularity == "layer" else config.depth_share
    history: list[StepRecord] = []
    container, removed = "", list[int]()
    if share > 0:
        history, container, removed = prune_blocks_(
            model,
            example_inputs,
            calibration,
            loss_fn,
            config.method,
            config.layer_floor,
            initial * config.target**share,
            config.target_metric,
            on_step,
            nearest=config.granularity == "channel",
            block_score=config.block_score,
        )
    plan = Plan()
    if config.granularity == "channel":
        now = None if removed else before  # whole blocks gone: counted again
        widths, plan = prune_channels_(
            model,
            example_inputs,
            calibration,
            loss_fn,
            config,
            on_step,
            final,
            finetune,
            now,
            guard,
        )
        history += widths
    if removed:
        plan.block_container, plan.blocks_removed = container, removed
        plan.config_updates |= {
            k: getattr(getattr(model, "config", None), k, None)
            for k in ("num_hidden_layers", "n_layer", "layer_types")
            if getattr(getattr(model, "config", None), k, None) is not None
        }
    return history, plan


def prune(*args: Any, **kwargs: Any) -> PruneResult:
    """`prune_` under its old name, for one release: it prunes in place, as `prune_` says."""
    warnings.warn(
        "worker.engine.prune is now prune_ (it changes the model in place); "
        "the old name goes in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return prune_(*args, **kwargs)


def reachable_fraction(
    model: nn.Module, example_inputs: Any, config: PruneConfig, before: Cost | None = None
) -> float:
    """The smallest fraction of `config.target_metric` that structured pruning can reach under
    `config` (floors, ignored layers, uniform widths, what the config can describe, depth):
    measured by pruning a copy as far as the constraints allow. Scores do not matter for that,
    so the copy is pruned by magnitude, in one step, without data."""
    trial = copy.deepcopy(model).eval()
    limit = replace(
        config,
        method="magnitude",
        block_score="loss",  # the magnitude of each block's weights: no data either
        target=1e-9,
        steps=1,
        recalibrate_batchnorm=False,
    )
    if before is None:
        before = measure(trial, example_inputs)
    else:  # the model's count, its per-module figures moved onto the copy's modules
        copies = dict(zip(model.modules(), trial.modules(), strict=True))
        macs = {copies[m]: value for m, value in before.module_macs.items() if m in copies}
        before = replace(before, module_macs=macs)
    history, _ = _prune_structure_(trial, example_inputs, [], _no_loss, limit, None, before)
    after = history[-1] if history else before
    return after.metric(config.target_metric) / before.metric(config.target_metric)


def _no_loss(model: nn.Module, batch: Any) -> Tensor:
    raise AssertionError("data-free pruning computes no loss")
