"""How channel pruning ranks and chooses units, in cases a mutation run of the selection in
`worker/engine/structured.py` found untested (issue 20, build item 7): exact covers, groups that
score nothing, per-group normalisation (max and LAMP), magnitude's L2 norm, chunks of `round_to`,
floors, uniform widths in exact steps, and the order of ties.

Every model is a chain of Linear layers on one example row, so a hidden unit's saving is its row
of the layer before and its column of the layer after: the outcomes are worked out by hand.
Scores sit on the biases (`fixed_scores`): a channel's score is |its bias score| over the two
Linear members of its group, the same factor for every channel.
"""

import itertools
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.engine import models
from tests.engine.fixed_scores import FIXED, use_fixed_scores
from worker.engine import PruneConfig, PruneResult, measure, prune_, reachable_fraction


def _chain(*widths: int) -> nn.Sequential:
    """Linear layers of the given widths with ReLUs between; the last is the output layer."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(widths):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


def _example(width: int) -> Tensor:
    return torch.randn(1, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _widths(model: nn.Sequential) -> list[int]:
    """Output widths of the Linear layers, in order."""
    return [p.shape[0] for name, p in model.named_parameters() if name.endswith("weight")]


def _weight(model: nn.Sequential, layer: int) -> Tensor:
    return dict(model.named_parameters())[f"{layer}.weight"].detach().clone()


def _bias(model: nn.Sequential, layer: int) -> Tensor:
    return dict(model.named_parameters())[f"{layer}.bias"].detach().clone()


def _prune(model: nn.Sequential, **settings: Any) -> PruneResult:
    defaults: dict[str, Any] = {"method": FIXED, "steps": 1}
    config = PruneConfig(**(defaults | settings))
    example = _example(_weight(model, 0).shape[1])
    return prune_(model, example, [], models.cross_entropy, config)


def _bias_scores(
    monkeypatch: pytest.MonkeyPatch, model: nn.Sequential, **by_layer: list[float]
) -> None:
    """Scores on the biases of the named layers ("0", "2", …); every other parameter scores 0."""
    params = dict(model.named_parameters())
    use_fixed_scores(
        monkeypatch,
        {
            params[f"{layer}.bias"]: torch.tensor(values, dtype=torch.float64)
            for layer, values in by_layer.items()
        },
    )


def _units_kept(bias_before: Tensor, model: nn.Sequential, layer: int) -> list[int]:
    """Which units of the layer pruning kept, told apart by their (distinct) biases."""
    return [i for i, b in enumerate(bias_before.tolist()) if b in _bias(model, layer).tolist()]


@pytest.mark.parametrize("global_ranking", [True, False])
@pytest.mark.parametrize(("target", "kept"), [(0.9, 9), (0.5, 5)])
def test_a_goal_that_whole_units_meet_exactly_takes_no_unit_more(
    global_ranking: bool, target: float, kept: int
) -> None:
    """4 → 10 → 2 on one row costs 60 MACs, each hidden unit 4 + 2 = 6: a goal of 54 (30) is
    met by exactly 1 (5) units, and the selection stops there."""
    model = _chain(4, 10, 2)

    result = _prune(model, method="magnitude", target=target, global_ranking=global_ranking)

    assert result.initial_macs == 60
    assert _widths(model) == [kept, 2]
    assert result.macs == target * 60


@pytest.mark.parametrize("normalisation", ["max", "lamp"])
def test_a_group_that_scores_nothing_loses_its_units_first(
    monkeypatch: pytest.MonkeyPatch, normalisation: str
) -> None:
    """The first hidden group's scores are all 0: normalised they stay 0 (not 0/0), below the
    second group's, and its ties go in unit order."""
    model = _chain(4, 4, 4, 2)
    _bias_scores(monkeypatch, model, **{"2": [1.0, 0.5, 0.6, 0.7]})
    first = _bias(model, 0)

    # 40 MACs; a unit saves 8 (first group) or 6
    _prune(model, target=0.9, cost_aware=False, normalisation=normalisation)

    assert _widths(model) == [3, 4, 2]
    assert _units_kept(first, model, 0) == [1, 2, 3]


@pytest.mark.parametrize(
    ("normalisation", "first_kept", "second_kept"),
    [
        # by the group's largest: 0.25 (first group) < 0.3 (second), ties in unit order
        ("max", [0, 2, 3], [0, 1, 2, 3]),
        # LAMP: 0.25 / 1.75 ≈ 0.14 (first) > 0.3 / 3.3 ≈ 0.09 (second)
        ("lamp", [0, 1, 2, 3], [0, 2, 3]),
    ],
)
def test_groups_compete_on_scores_normalised_within_each_group(
    monkeypatch: pytest.MonkeyPatch,
    normalisation: str,
    first_kept: list[int],
    second_kept: list[int],
) -> None:
    model = _chain(4, 4, 4, 2)
    # scales 16 apart, and the larger group's top above 1: raw scores would prune the first
    _bias_scores(
        monkeypatch, model, **{"0": [0.25, 0.0625, 0.0625, 0.0625], "2": [4.0, 1.2, 4.0, 4.0]}
    )
    first, second = _bias(model, 0), _bias(model, 2)

    _prune(model, target=0.9, cost_aware=False, normalisation=normalisation)

    assert _units_kept(first, model, 0) == first_kept
    assert _units_kept(second, model, 2) == second_kept


def test_lamp_weights_keeps_lamps_widths_and_the_scores_channels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """How many units each group keeps is magnitude + LAMP's; which ones, the scores': the
    lowest-scored go, not the smallest weights. LAMP on the scores themselves would keep other
    widths."""
    magnitude_model, model, lamp_model = _chain(4, 4, 4, 2), _chain(4, 4, 4, 2), _chain(4, 4, 4, 2)
    first, second = _bias(model, 0), _bias(model, 2)
    settings: dict[str, Any] = {"target": 0.6, "cost_aware": False}
    _prune(magnitude_model, method="magnitude", normalisation="lamp", **settings)
    by_scores = {"0": [0.3, 0.1, 0.4, 0.2], "2": [0.2, 0.4, 0.1, 0.9]}
    _bias_scores(monkeypatch, model, **by_scores)
    _prune(lamp_model, normalisation="lamp", **settings)

    _prune(model, normalisation="lamp_weights", **settings)

    assert _widths(model) == _widths(magnitude_model) == [2, 3, 2]
    assert _widths(lamp_model) != [2, 3, 2]
    assert _units_kept(first, model, 0) == [0, 2]  # scored 0.3 and 0.4
    assert _units_kept(second, model, 2) == [0, 1, 3]  # 0.2, 0.4 and 0.9
    assert _units_kept(first, magnitude_model, 0) != [0, 2]


def test_max_normalisation_lets_a_group_of_small_scores_compete(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Raw, every score of the first group (≤ 0.25) is below every one of the second (≥ 2);
    normalised, the second group's 0.5 is the lowest of all."""
    model = _chain(4, 4, 4, 2)
    _bias_scores(
        monkeypatch,
        model,
        **{"0": [0.25, 0.225, 0.2375, 0.2425], "2": [4.0, 2.0, 2.4, 2.8]},
    )
    second = _bias(model, 2)

    _prune(model, target=0.9, cost_aware=False)

    assert _widths(model)[0] == 4
    assert _units_kept(second, model, 2) == [0, 2, 3]


def test_magnitude_ranks_a_channel_by_the_l2_norm_of_its_weights() -> None:
    """Row 0 = (1, 1, 1, 1): L2 2, L1 4; row 1 = (2.5, 0, 0, 0): L2 2.5, L1 2.5. By L2 row 0
    goes; by L1 it would be row 1. The next layer's columns are equal."""
    model = _chain(4, 3, 2)
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["0.weight"].copy_(torch.tensor([[1.0] * 4, [2.5, 0, 0, 0], [3.0] * 4]))
        params["0.bias"].copy_(torch.tensor([1e-3, 2e-3, 3e-3]))  # tells units apart
        params["2.weight"].fill_(1.0)
    first = _bias(model, 0)

    _prune(model, method="magnitude", target=0.7)  # 18 MACs, 6 a unit: one goes

    assert _units_kept(first, model, 0) == [1, 2]


@pytest.mark.parametrize(("hidden", "kept"), [(10, 4), (16, 8)])
def test_round_to_removes_whole_chunks_down_to_a_multiple(hidden: int, kept: int) -> None:
    """A width that is not a multiple first loses the remainder (10 → 8), then chunks of
    `round_to`; half of 6 MACs a unit is 5 (8) units, so 6 (8) go."""
    model = _chain(4, hidden, 2)

    result = _prune(model, method="magnitude", target=0.5, round_to=4)

    assert _widths(model) == [kept, 2]
    assert result.macs <= 0.5 * result.initial_macs


@pytest.mark.parametrize("global_ranking", [True, False])
@pytest.mark.parametrize(
    ("widths", "floor_macs"),
    [
        ((4, 10, 2), 4 + 2),  # the predicted savings of all 9 removable units fall short
        ((4, 10, 10, 2), 4 + 1 + 2),
    ],
)
def test_every_group_can_be_pruned_down_to_its_floor_of_one_unit(
    global_ranking: bool, widths: tuple[int, ...], floor_macs: int
) -> None:
    """layer_floor 0.1 of 10 units keeps max(1, ⌈1⌉) = 1 unit, and that is what the target
    asks for: the floor is reachable, and reached."""
    model, example = _chain(*widths), _example(4)
    target = floor_macs / measure(model, example).macs
    config = PruneConfig(method="magnitude", target=target, steps=1, global_ranking=global_ranking)
    assert reachable_fraction(model, example, config) == target

    result = prune_(model, example, [], models.cross_entropy, config)

    assert _widths(model) == [1] * (len(widths) - 2) + [2]
    assert result.macs == floor_macs


@pytest.mark.parametrize("inner", [32, 64])
def test_uniform_widths_keep_a_layer_and_its_4x_layer_exactly_1_to_4(inner: int) -> None:
    """gcd(8, 32) = 8 and gcd(16, 64) = 16 are at least 8: exact steps of 1/gcd."""
    model = _chain(4, inner // 4, inner, 2)

    result = _prune(model, method="magnitude", target=0.5, steps=3, global_ranking=False)

    first, second, _ = _widths(model)
    assert second == 4 * first < inner
    assert result.macs <= 0.5 * result.initial_macs


@pytest.mark.parametrize(
    ("widths", "target", "kept"),
    [
        # steps of 1/10: 4 of 10 and round(0.3 · 4) = 1 of 3 units save a predicted 40 of the
        # 38 MACs over the goal; measured, 40 > 38: one more step takes 1 and round(0.3) = 0
        ((4, 10, 3, 2), 0.5, [5, 2, 2]),
        ((4, 12, 5, 2), 0.5, [7, 3, 2]),
        # steps of 1/20, units of 6 and 22 MACs, 30.5 over the goal: depth 5 (5 and round(0.5)
        # = 0 units) saves 30, depth 6 (6 and 1) 58. Stopping short at depth 5 and taking the
        # rest in rounds of round(0.05 d) = 0 units of the small group would keep it whole.
        ((4, 20, 2, 2), 93.5 / 124, [14, 1, 2]),
    ],
)
def test_uniform_widths_in_rounded_steps_take_each_group_s_share_of_a_step(
    widths: tuple[int, ...], target: float, kept: list[int]
) -> None:
    """gcd(10, 3) = 1 is under 8: steps of 1/max width, each group losing its share of the
    first step whose predicted saving covers the excess, rounded."""
    model = _chain(*widths)

    result = _prune(model, method="magnitude", target=target, global_ranking=False)

    assert _widths(model) == kept
    assert result.macs <= target * result.initial_macs


def test_uniform_widths_reach_a_deep_goal_in_one_step() -> None:
    """A quarter of the 4480 MACs of 4 → 64 → 64 → 2 is 34 of 64 units from each group, in one
    step: one search for the depth, not a round per unit (a step has at most 25 rounds)."""
    model = _chain(4, 64, 64, 2)

    result = _prune(model, method="magnitude", target=0.25, global_ranking=False)

    assert _widths(model) == [30, 30, 2]  # 1080 MACs; 31 would be 1147 > 1120
    assert result.target_met


def test_a_wide_group_loses_hundreds_of_units_in_one_step() -> None:
    """Half of 4 → 1000 → 2 is 500 units: the savings of a group's chunks are each chunk's own,
    so one round takes them all (a step has at most 25 rounds)."""
    model = _chain(4, 1000, 2)

    result = _prune(model, method="magnitude", target=0.5)

    assert _widths(model) == [500, 2]
    assert result.target_met


def test_ties_go_in_group_order_then_unit_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing scores: every unit ties at 0 (36 candidates, 20 units a group: where an unstable
    sort reorders). One group, the first in the traced order, loses its first units: 3 of them
    (24 or 22 MACs each) cover the 62.4 MACs over the goal."""
    model = _chain(4, 20, 20, 2)
    use_fixed_scores(monkeypatch, {})
    before = {layer: _bias(model, layer) for layer in (0, 2)}

    result = _prune(model, target=0.88)  # of 520 MACs

    assert result.initial_macs == 520
    removed = [
        sorted(set(range(20)) - set(_units_kept(bias, model, layer)))
        for layer, bias in before.items()
    ]
    assert sorted(removed) == [[], [0, 1, 2]]


def test_attention_heads_are_removed_one_head_at_a_time() -> None:
    """One of 4 heads saves 1680 of 10656 MACs: a tenth of them is one head, not a pair."""
    torch.manual_seed(0)
    model = models.AttentionBlock(dim=8, heads=4, hidden=12)
    batches = models.classification_batches((4, 5, 8), 3, 1, seed=0)
    config = PruneConfig(
        method="magnitude",
        target=0.9,
        steps=1,
        attention_heads={"query": 4},
        ignored_layers=("out", "fc1", "fc2"),  # the heads are the only group
    )

    result = prune_(model, batches[0][0], batches, models.cross_entropy, config)

    assert (result.initial_macs, result.macs) == (10656, 8976)
    assert model.num_heads == 3
