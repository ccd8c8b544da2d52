"""Channel pruning: targets, floors, ignored layers, shapes, schedules and callbacks."""

import copy
import math

import pytest
import torch
from torch import nn

from tests.engine import models
from worker.engine import InvalidConfig, PruneConfig, UnsupportedModel, measure, prune_
from worker.engine.config import TargetMetric
from worker.engine.graph import build_graph
from worker.engine.groups import channel_costs, collect_groups

CALIBRATION = models.classification_batches((8, 3, 8, 8), 3, 3, seed=1)
EXAMPLE = CALIBRATION[0][0]


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return models.ResidualCNN(width=16, in_channels=3)


def _largest_unit_cost(model: nn.Module, metric: str) -> float:
    """The most one channel of any group costs in the unpruned model: "one step" of the target."""
    names = {m: n for n, m in model.named_modules()}
    graph = build_graph(model, EXAMPLE)
    groups = collect_groups(graph, names, [model.get_submodule("head")], {}, lambda g: True)
    cost = measure(model, EXAMPLE)
    return max(float(channel_costs(g, cost, metric).max()) for g in groups)


@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("method", ["oba", "magnitude"])
def test_lands_at_or_under_the_target_within_one_channel(metric: TargetMetric, method: str) -> None:
    model = _cnn()
    one_step = _largest_unit_cost(copy.deepcopy(model), metric)
    config = PruneConfig(method=method, target_metric=metric, target=0.5, steps=3)

    result = prune_(model, EXAMPLE, CALIBRATION, models.cross_entropy, config)

    initial = result.initial_macs if metric == "macs" else result.initial_params
    final = result.macs if metric == "macs" else result.params
    goal = 0.5 * initial
    assert final <= goal
    assert goal - final <= one_step
    assert result.target_met
    assert [r.step for r in result.history] == [1, 2, 3]


def test_exponential_schedule_decreases_geometrically() -> None:
    model = _cnn()
    result = prune_(
        model,
        EXAMPLE,
        CALIBRATION,
        models.cross_entropy,
        PruneConfig(method="taylor", target=0.25, steps=2),
    )

    first_goal = 0.25**0.5 * result.initial_macs
    assert first_goal * 0.8 <= result.history[0].macs <= first_goal
    assert result.history[1].macs <= 0.25 * result.initial_macs


def test_output_shape_and_ignored_layers_are_kept() -> None:
    model = _cnn()
    before = model(EXAMPLE).shape
    result = prune_(
        model,
        EXAMPLE,
        CALIBRATION,
        models.cross_entropy,
        PruneConfig(target=0.4, steps=2, ignored_layers=("conv1",)),
    )

    assert model.conv1.out_channels == 16 and model.bn1.num_features == 16
    assert model.head.out_features == 3
    assert model(EXAMPLE).shape == before
    assert result.macs < result.initial_macs


def test_layer_floor_keeps_every_group_alive() -> None:
    model = _cnn()
    result = prune_(
        model,
        EXAMPLE,
        CALIBRATION,
        models.cross_entropy,
        PruneConfig(method="oba", target=0.1, steps=2, layer_floor=0.25),
    )

    widths = result.history[-1].widths
    assert widths
    assert all(width >= math.ceil(0.25 * 16) for width in widths.values())


def test_round_to_keeps_multiples() -> None:
    model = _cnn()
    result = prune_(
        model,
        EXAMPLE,
        CALIBRATION,
        models.cross_entropy,
        PruneConfig(target=0.5, steps=2, round_to=4),
    )

    assert all(width % 4 == 0 for width in result.history[-1].widths.values())


def test_uniform_widths_prune_equal_groups_equally() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    calibration = models.classification_batches((16, 6), 3, 2, seed=0)

    result = prune_(
        model,
        calibration[0][0],
        calibration,
        models.cross_entropy,
        PruneConfig(target=0.5, steps=2, global_ranking=False),
    )

    assert model[0].out_features == model[2].out_features < 16
    assert result.macs <= 0.5 * result.initial_macs


def test_finetune_runs_after_every_step() -> None:
    calls: list[int] = []
    prune_(
        _cnn(),
        EXAMPLE,
        CALIBRATION,
        models.cross_entropy,
        PruneConfig(target=0.5, steps=3),
        finetune=lambda model, step: calls.append(step),
    )

    assert calls == [1, 2, 3]


def test_attention_heads_are_pruned_whole() -> None:
    torch.manual_seed(0)
    model = models.AttentionBlock(dim=8, heads=4, hidden=12)
    calibration = models.classification_batches((4, 5, 8), 3, 2, seed=0)

    # the block adds its input to the residual stream: the graph cannot see that coupling
    prune_(
        model,
        calibration[0][0],
        calibration,
        models.cross_entropy,
        PruneConfig(
            method="oba_full",
            target=0.6,
            steps=2,
            attention_heads={"query": 4},
            ignored_layers=("out", "fc2"),
        ),
    )

    width = model.query.out_features
    assert width % 2 == 0 and width < 8  # whole heads of head_dim 2
    assert model.key.out_features == model.value.out_features == model.out.in_features == width
    assert model.num_heads == width // 2
    assert model(calibration[0][0]).shape == (4, 3)


def test_a_removal_that_breaks_the_model_is_a_clear_error() -> None:
    torch.manual_seed(0)
    model = models.AttentionBlock(dim=8, heads=4, hidden=12)
    calibration = models.classification_batches((4, 5, 8), 3, 2, seed=0)

    with pytest.raises(UnsupportedModel, match="ignored_layers"):
        prune_(
            model,
            calibration[0][0],
            calibration,
            models.cross_entropy,
            PruneConfig(method="magnitude", target=0.3, steps=1, attention_heads={"query": 4}),
        )


def test_unknown_ignored_layer_is_invalid_config() -> None:
    with pytest.raises(InvalidConfig, match="not found"):
        prune_(
            _cnn(),
            EXAMPLE,
            CALIBRATION,
            models.cross_entropy,
            PruneConfig(ignored_layers=("nope",)),
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": 1.5},
        {"steps": 0},
        {"method": "lamp"},
        {"target_metric": "sparsity"},
        {"granularity": "unstructured", "target_metric": "macs"},
        {"layer_floor": 1.0},
    ],
)
def test_invalid_configs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidConfig):
        PruneConfig(**kwargs)  # type: ignore[arg-type]


def test_pruning_keeps_the_callers_mode_and_batchnorm_statistics() -> None:
    model = _cnn().train()
    before = {name: b.clone() for name, b in model.named_buffers()}

    prune_(
        model,
        EXAMPLE,
        CALIBRATION,
        models.cross_entropy,
        PruneConfig(target=0.6, steps=1, recalibrate_batchnorm=False),
    )

    assert all(m.training for m in model.modules())
    kept = dict(model.named_buffers())
    assert int(kept["bn0.num_batches_tracked"]) == int(before["bn0.num_batches_tracked"])
