"""Group-score aggregation on hand-computed cases."""

from typing import Any

import pytest
import torch
from torch import nn

from worker.engine import scores as scores_module
from worker.engine.config import PruneConfig
from worker.engine.graph import build_graph
from worker.engine.groups import ChannelGroup, channel_scores, collect_groups
from worker.engine.scores import register_scorer, registered_scorer
from worker.engine.structured import unit_scores_of


def _only_group(model: nn.Module, example: torch.Tensor, ignored: list[Any]) -> ChannelGroup:
    names = {m: n for n, m in model.named_modules()}
    groups = collect_groups(build_graph(model, example), names, ignored, {}, lambda g: True)
    assert len(groups) == 1
    return groups[0]


def test_signed_channel_sums_are_averaged_over_linear_members() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    group = _only_group(model, torch.randn(1, 2), [model[2]])
    scores: dict[Any, torch.Tensor] = {
        model[0].weight: torch.tensor([[1.0, -3.0], [2.0, 2.0]], dtype=torch.float64),
        model[0].bias: torch.tensor([0.5, -1.0], dtype=torch.float64),
        model[2].weight: torch.tensor([[4.0, -6.0]], dtype=torch.float64),
        model[2].bias: torch.tensor([9.0], dtype=torch.float64),  # not a member of the group
    }

    result = channel_scores(group, scores, "oba")

    # channel 0: |1 - 3 + 0.5| = 1.5 and |4| = 4; channel 1: |2 + 2 - 1| = 3 and |-6| = 6
    torch.testing.assert_close(
        result, torch.tensor([(1.5 + 4) / 2, (3 + 6) / 2], dtype=torch.float64)
    )


def test_a_scorer_registered_with_abs_reduction_sums_absolute_element_scores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Channel 0's element scores cancel (signed sum 0.5, absolute sum 6.5); channel 1's do not
    (3 either way): the signed reduction ranks channel 0 lower, the absolute one higher."""
    monkeypatch.setattr(scores_module, "_SCORERS", dict(scores_module._SCORERS))
    register_scorer("oba_abs", registered_scorer("oba"), reduction="abs")
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    group = _only_group(model, torch.randn(1, 2), [model[2]])
    scores: dict[Any, torch.Tensor] = {
        model[0].weight: torch.tensor([[3.5, -3.0], [1.0, 2.0]], dtype=torch.float64),
        model[2].weight: torch.zeros(1, 2, dtype=torch.float64),
    }

    signed = channel_scores(group, scores, "oba")
    absolute = channel_scores(group, scores, "oba_abs")

    torch.testing.assert_close(signed, torch.tensor([0.5 / 2, 3 / 2], dtype=torch.float64))
    torch.testing.assert_close(absolute, torch.tensor([6.5 / 2, 3 / 2], dtype=torch.float64))
    assert signed.argmin() == 0 and absolute.argmin() == 1


def test_batchnorm_members_are_excluded_and_magnitude_is_l2() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1, bias=False)
    )
    group = _only_group(model, torch.randn(1, 1, 2, 2), [model[2]])
    scores: dict[Any, torch.Tensor] = {
        model[0].weight: torch.tensor([3.0, -4.0], dtype=torch.float64).view(2, 1, 1, 1),
        model[1].weight: torch.tensor([100.0, 100.0], dtype=torch.float64),
        model[1].bias: torch.tensor([100.0, 100.0], dtype=torch.float64),
        model[2].weight: torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1),
    }

    signed = channel_scores(group, scores, "oba")
    l2 = channel_scores(group, {p: s.abs() for p, s in scores.items()}, "magnitude")

    torch.testing.assert_close(
        signed, torch.tensor([(3 + 1) / 2, (4 + 2) / 2], dtype=torch.float64)
    )
    torch.testing.assert_close(l2, torch.tensor([(3 + 1) / 2, (4 + 2) / 2], dtype=torch.float64))


def test_flattened_inputs_sum_back_to_their_root_channel() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 1, bias=False), nn.Flatten(), nn.Linear(2 * 2 * 2, 1, bias=False)
    )
    group = _only_group(model, torch.randn(1, 1, 2, 2), [model[2]])
    scores: dict[Any, torch.Tensor] = {
        model[0].weight: torch.zeros(2, 1, 1, 1, dtype=torch.float64),
        model[2].weight: torch.arange(8, dtype=torch.float64).view(1, 8),
    }

    result = channel_scores(group, scores, "oba")

    # the linear layer sees channel 0 as inputs 0-3 and channel 1 as inputs 4-7
    torch.testing.assert_close(
        result, torch.tensor([(0 + 6) / 2, (0 + 22) / 2], dtype=torch.float64)
    )


def test_units_of_several_channels_are_normalised_per_channel() -> None:
    """A head of 2 channels counts as its 2 channels against the group's best channel, so it
    competes with one-channel units (FFN neurons) as the channels it holds."""
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    group = _only_group(model, torch.randn(1, 2), [model[2]])
    group.unit = 2  # two heads of two channels
    scores: dict[Any, torch.Tensor] = {
        model[0].weight: torch.tensor([[1.0, 0], [3, 0], [2, 0], [2, 0]], dtype=torch.float64),
        model[2].weight: torch.tensor([[1.0, 3, 2, 2]], dtype=torch.float64),
    }

    units = unit_scores_of(group, scores, PruneConfig())

    # channel scores 1, 3, 2, 2 over the best channel (3), summed per head
    torch.testing.assert_close(units, torch.tensor([4 / 3, 4 / 3], dtype=torch.float64))
    group.unit = 1
    torch.testing.assert_close(
        unit_scores_of(group, scores, PruneConfig()),
        torch.tensor([1 / 3, 1, 2 / 3, 2 / 3], dtype=torch.float64),
    )


def test_lamp_normalisation_divides_each_channel_by_the_scores_at_least_as_large() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    group = _only_group(model, torch.randn(1, 2), [model[2]])
    scores: dict[Any, torch.Tensor] = {
        model[0].weight: torch.tensor([[1.0, 0], [4, 0], [2, 0], [3, 0]], dtype=torch.float64),
        model[2].weight: torch.tensor([[1.0, 4, 2, 3]], dtype=torch.float64),
    }

    units = unit_scores_of(group, scores, PruneConfig(normalisation="lamp"))

    # channel scores 1, 4, 2, 3: each over itself plus every larger one
    expected = torch.tensor([1 / 10, 4 / 4, 2 / 9, 3 / 7], dtype=torch.float64)
    torch.testing.assert_close(units, expected)


def _weighted_units(normalisation: str, channel_scores: list[float]) -> torch.Tensor:
    """The unit values `normalisation` gives Linear(2, 4) → Linear(4, 1) whose channels' weights
    have magnitudes 1, 4, 2, 3 in each layer (LAMP values 1/10, 1, 2/9, 3/7), each layer's
    channels scored `channel_scores`."""
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0], [-4, 0], [2, 0], [3, 0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[-1.0, 4, 2, -3]]))
    group = _only_group(model, torch.randn(1, 2, dtype=torch.float64), [model[2]])
    first = torch.tensor([[score, 0.0] for score in channel_scores], dtype=torch.float64)
    scores: dict[Any, torch.Tensor] = {model[0].weight: first, model[2].weight: first[:, 0][None]}
    return unit_scores_of(group, scores, PruneConfig(normalisation=normalisation))


def test_lamp_weights_hands_the_weights_lamp_values_out_in_the_order_of_the_scores() -> None:
    """The scores 2, 9, 5, 1 rank channel 3 lowest, then 0, 2 and 1, so they get LAMP's values
    of the weights from the lowest up."""
    units = _weighted_units("lamp_weights", [2.0, 9, 5, 1])

    expected = torch.tensor([2 / 9, 1, 3 / 7, 1 / 10], dtype=torch.float64)
    torch.testing.assert_close(units, expected)


def test_lamp_rank_sum_hands_the_same_values_out_by_the_scores_rank_plus_the_weights() -> None:
    """Ranks from the lowest: by score (2, 9, 1, 5) 1, 3, 0, 2, by weight 0, 3, 1, 2; their sums
    1, 6, 1, 4 put channels 0 and 2 level, and the lower score (channel 2) goes first: channels
    2, 0, 3, 1 get LAMP's values of the weights from the lowest up."""
    units = _weighted_units("lamp_rank_sum", [2.0, 9, 1, 5])

    expected = torch.tensor([2 / 9, 1, 1 / 10, 3 / 7], dtype=torch.float64)
    torch.testing.assert_close(units, expected)
