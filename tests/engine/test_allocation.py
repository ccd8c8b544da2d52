"""Where structured pruning spends its budget: cost-aware ranking, allocation rules of one's
own, and the schedule of per-step targets, against outcomes worked out by hand.

docs/engine.md: `cost_aware` ranks units by score per MAC they cost (lowest first); step i of n
keeps target^(i/n) of the metric (`exponential`) or 1 − (1 − target)·i/n (`linear`);
`register_allocation` makes a rule's name a `PruneConfig.normalisation`.
"""

import pytest
import torch
from torch import Tensor, nn

from tests.engine import models
from tests.engine.fixed_scores import FIXED, use_fixed_scores
from worker.engine import (
    ALLOCATIONS,
    InvalidConfig,
    PruneConfig,
    allocation_names,
    prune_,
    register_allocation,
)
from worker.engine import allocation as allocation_module
from worker.engine.allocation import (
    Candidate,
    floor_units,
    max_normalised,
    select_units,
    take_until,
)
from worker.engine.config import Schedule
from worker.engine.cost import Cost
from worker.engine.groups import ChannelGroup, channel_costs, unit_view
from worker.engine.unstructured import eligible_weights

# Normalised channel scores of the two hidden layers: by score alone, the second's go first.
FIRST = torch.tensor([1.0, 0.9, 0.95, 0.92, 0.97, 0.99, 0.93, 0.96], dtype=torch.float64)
SECOND = torch.tensor([1.0, 0.5, 0.6, 0.55, 0.7, 0.65, 0.75, 0.8], dtype=torch.float64)


def _funnel() -> nn.Sequential:
    """32 → 8 → 8 → 2: per sample, a channel of the first hidden layer costs 32 + 8 = 40 MACs
    (its row of the first layer, its column of the second), one of the second 8 + 2 = 10."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
    ).double()


def _funnel_scores(model: nn.Sequential) -> dict[nn.Parameter, Tensor]:
    """Element scores whose channel sums are FIRST and SECOND (the other members score 0)."""
    params = dict(model.named_parameters())
    return {params["0.weight"]: FIRST.view(8, 1).expand(8, 32) / 32, params["2.bias"]: SECOND}


@pytest.mark.parametrize(
    ("cost_aware", "first_removed", "second_removed"),
    [
        # per MAC the first layer's channels are the cheapest to lose (0.9/40 < 0.5/10): its
        # lowest, channel 1, alone saves the 10% (4 samples × 40 of 1344 MACs)
        (True, [1], []),
        # by score alone the second layer's go, lowest first, until 4 × 40 MACs cover the 134.4
        (False, [], [1, 3, 2, 5]),
    ],
)
def test_cost_aware_ranking_removes_by_score_per_mac(
    monkeypatch: pytest.MonkeyPatch,
    cost_aware: bool,
    first_removed: list[int],
    second_removed: list[int],
) -> None:
    model = _funnel()
    use_fixed_scores(monkeypatch, _funnel_scores(model))
    first, second = model[0].weight.detach().clone(), model[2].weight.detach().clone()

    result = prune_(
        model,
        torch.randn(4, 32, dtype=torch.float64),
        [],
        models.cross_entropy,
        PruneConfig(method=FIXED, target=0.9, steps=1, cost_aware=cost_aware),
    )

    assert result.initial_macs == 4 * (32 * 8 + 8 * 8 + 8 * 2)
    assert result.history[-1].channels_removed == len(first_removed) + len(second_removed)
    first_kept = [i for i in range(8) if i not in first_removed]
    second_kept = [i for i in range(8) if i not in second_removed]
    assert torch.equal(model[0].weight.detach(), first[first_kept])
    assert torch.equal(model[2].weight.detach(), second[second_kept][:, first_kept])


def _second_layer_first(
    groups: list[ChannelGroup],
    unit_scores: dict[nn.Module, Tensor],
    cost: Cost,
    excess: float,
    initial_units: dict[nn.Module, int],
    config: PruneConfig,
) -> list[Candidate]:
    """An allocation rule of a user's own: the second hidden layer's units, lowest score first,
    before any other group's, whatever they cost."""
    ranked = []
    for group in sorted(groups, key=lambda g: g.name != "2"):
        savings = unit_view(channel_costs(group, cost, config.target_metric), group)
        order = torch.argsort(unit_scores[group.root], stable=True).tolist()
        removable = group.units - floor_units(group, initial_units, config)
        for unit in order[:removable]:
            value = float(unit_scores[group.root][unit])
            ranked.append(Candidate(value, group, [unit], float(savings[unit])))
    return take_until(ranked, excess)


def _reversed(group: ChannelGroup, channel_scores: Tensor) -> Tensor:
    """Unit values of a user's own: the best channels look the cheapest to lose."""
    return -max_normalised(group, channel_scores)


@pytest.mark.parametrize(
    ("allocation", "first_removed", "second_removed"),
    [
        # the built-in rule, as in the cost-aware test above: channel 1 of the first layer
        ("max", [1], []),
        # the second layer first, lowest scores first, until 4 × 40 MACs cover the 134.4
        ("second layer first", [], [1, 3, 2, 5]),
        # negated values per MAC: the second layer's best channels (−1/10, −0.8/10, …) go
        ("reversed", [], [0, 7, 6, 4]),
    ],
)
def test_a_registered_allocation_decides_what_is_removed(
    monkeypatch: pytest.MonkeyPatch,
    allocation: str,
    first_removed: list[int],
    second_removed: list[int],
) -> None:
    monkeypatch.setattr(allocation_module, "_ALLOCATIONS", dict(allocation_module._ALLOCATIONS))
    register_allocation("second layer first", _second_layer_first)
    register_allocation("reversed", select_units, unit_scores=_reversed)
    model = _funnel()
    use_fixed_scores(monkeypatch, _funnel_scores(model))
    first, second = model[0].weight.detach().clone(), model[2].weight.detach().clone()

    prune_(
        model,
        torch.randn(4, 32, dtype=torch.float64),
        [],
        models.cross_entropy,
        PruneConfig(method=FIXED, target=0.9, steps=1, normalisation=allocation),
    )

    first_kept = [i for i in range(8) if i not in first_removed]
    second_kept = [i for i in range(8) if i not in second_removed]
    assert torch.equal(model[0].weight.detach(), first[first_kept])
    assert torch.equal(model[2].weight.detach(), second[second_kept][:, first_kept])


def test_an_allocation_is_a_registered_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocation_module, "_ALLOCATIONS", dict(allocation_module._ALLOCATIONS))
    assert allocation_names() == ALLOCATIONS == ("max", "lamp", "lamp_weights", "lamp_rank_sum")
    with pytest.raises(
        InvalidConfig, match=r"'mine'.*'max', 'lamp', 'lamp_weights', 'lamp_rank_sum'"
    ):
        PruneConfig(normalisation="mine")

    register_allocation("mine", _second_layer_first)

    assert allocation_names() == ("max", "lamp", "lamp_weights", "lamp_rank_sum", "mine")
    assert PruneConfig(normalisation="mine").normalisation == "mine"


def _kept_fractions(schedule: Schedule, kept: float, steps: int) -> list[float]:
    if schedule == "exponential":
        return [kept ** (i / steps) for i in range(1, steps + 1)]
    return [1 - (1 - kept) * i / steps for i in range(1, steps + 1)]


def test_the_schedules_keep_what_docs_engine_md_says() -> None:
    exponential = _kept_fractions("exponential", 0.25, 4)
    linear = _kept_fractions("linear", 0.25, 4)
    assert exponential == pytest.approx([0.25**0.25, 0.5, 0.25**0.75, 0.25])
    assert linear == pytest.approx([0.8125, 0.625, 0.4375, 0.25])

    expected: dict[Schedule, list[float]] = {"exponential": exponential, "linear": linear}
    for schedule, kept in expected.items():
        config = PruneConfig(target=0.25, steps=4, schedule=schedule)
        assert [config.step_target(i) for i in range(1, 5)] == pytest.approx(kept)


@pytest.mark.parametrize("schedule", ["exponential", "linear"])
def test_unstructured_steps_mask_the_scheduled_counts(schedule: Schedule) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    total = sum(w.numel() for w in eligible_weights(model, ()).values())
    steps: list[int] = []

    prune_(
        model,
        torch.randn(2, 8, dtype=torch.float64),
        [],
        models.cross_entropy,
        PruneConfig(
            method="magnitude",
            granularity="unstructured",
            target_metric="sparsity",
            target=0.75,
            steps=3,
            schedule=schedule,
        ),
        on_step=lambda record: steps.append(record.channels_removed),
    )

    assert steps == [round((1 - kept) * total) for kept in _kept_fractions(schedule, 0.25, 3)]


def test_structured_steps_reach_the_scheduled_macs() -> None:
    """Each step lands at or under its goal, within one channel; the linear ramp keeps more
    than the exponential one at every step but the last."""

    def per_step(schedule: Schedule) -> tuple[int, list[int]]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
        ).double()
        result = prune_(
            model,
            torch.randn(1, 16, dtype=torch.float64),
            [],
            models.cross_entropy,
            PruneConfig(method="magnitude", target=0.3, steps=3, schedule=schedule),
        )
        return result.initial_macs, [record.macs for record in result.history]

    one_channel = 16 + 32  # the dearest channel: the first hidden layer's, per sample
    schedules: tuple[Schedule, ...] = ("exponential", "linear")
    reached = {}
    for schedule in schedules:
        initial, reached[schedule] = per_step(schedule)
        goals = [kept * initial for kept in _kept_fractions(schedule, 0.3, 3)]
        for macs, goal in zip(reached[schedule], goals, strict=True):
            assert goal - one_channel <= macs <= goal

    assert all(
        linear > exponential
        for linear, exponential in zip(
            reached["linear"][:-1], reached["exponential"][:-1], strict=True
        )
    )
