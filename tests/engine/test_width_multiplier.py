"""CNNs whose config scales every width by one multiplier (MobileNetV2's `depth_multiplier`,
EfficientNet's `width_coefficient`): with uniform widths they are pruned to the model the class
builds at a smaller multiplier, channel for channel, and the config states that multiplier."""

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from tests.engine.fixed_scores import FIXED, use_fixed_scores
from tests.engine.hf_models import classification_loss, inputs_of
from worker.engine import PruneConfig, TargetUnreachable, measure, prune_
from worker.engine.plan import Plan, apply_plan_
from worker.engine.width_multiplier import GRID, MultipliedWidths


def _batches(count: int, size: int) -> list[dict[str, torch.Tensor]]:
    """Image batches of `size` pixels (EfficientNet's stride-32 stack needs 32)."""
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "pixel_values": torch.randn(4, 3, size, size, generator=generator),
            "labels": torch.randint(0, 3, (4,), generator=generator),
        }
        for _ in range(count)
    ]


def _mobilenet() -> nn.Module:
    config = transformers.MobileNetV2Config(depth_multiplier=0.5, image_size=16)
    config.num_labels = 3
    return transformers.MobileNetV2ForImageClassification(config)


def _efficientnet() -> nn.Module:
    config = transformers.EfficientNetConfig(
        width_coefficient=0.5, depth_coefficient=0.5, hidden_dim=640, image_size=32
    )
    config.num_labels = 3
    return transformers.EfficientNetForImageClassification(config)


BUILDERS: dict[str, tuple[Callable[[], nn.Module], str, int]] = {  # model, field, image size
    "mobilenet_v2": (_mobilenet, "depth_multiplier", 16),
    "efficientnet": (_efficientnet, "width_coefficient", 32),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name][0]().eval()


def _rebuilt(model: nn.Module) -> nn.Module:
    """The class built from the pruned model's config, holding the pruned weights (strictly)."""
    fresh = type(model)(copy.deepcopy(model.config)).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_prunes_to_the_model_its_class_builds_at_the_multiplier_it_states(name: str) -> None:
    model = _model(name)
    original = copy.deepcopy(model)
    _, field, size = BUILDERS[name]
    batches = _batches(2, size)
    example = inputs_of(batches[0])

    result = prune_(
        model,
        example,
        batches,
        classification_loss,
        PruneConfig(method="oba", target=0.5, steps=2, global_ranking=False),
    )

    assert result.macs <= 0.5 * result.initial_macs
    assert result.config_updates[field] == getattr(model.config, field) < 0.5
    rebuilt = _rebuilt(model)  # every layer as wide as the class builds it: a strict load
    replayed = apply_plan_(original, example, Plan.from_json(result.plan.to_json()))
    replayed.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        expected = model(**example).logits
        torch.testing.assert_close(rebuilt(**example).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(replayed.eval()(**example).logits, expected, rtol=0, atol=1e-6)


def test_efficientnet_states_its_last_convolution_width_as_hidden_dim() -> None:
    model = _model("efficientnet")
    batches = _batches(2, 32)

    result = prune_(
        model,
        inputs_of(batches[0]),
        batches,
        classification_loss,
        PruneConfig(method="magnitude", target=0.5, steps=1, global_ranking=False),
    )

    top_conv: Any = model.efficientnet.encoder.top_conv
    assert result.config_updates["hidden_dim"] == top_conv.out_channels < 640


def test_the_multiplier_is_the_largest_whose_model_meets_the_goal() -> None:
    """…and adds no residual: the class's own model one step up either misses the goal or
    switches a block's residual on (its input and output rounded to one width)."""
    model = _model("mobilenet_v2")
    example = inputs_of(_batches(1, 16)[0])
    before = measure(model, example)
    widths = MultipliedWidths(model, before, floor=0.1)
    goal = 0.4 * before.macs

    steps = widths.fit(goal, "macs")

    def built(steps: int) -> nn.Module:
        config = copy.deepcopy(model.config)
        config.depth_multiplier = steps / GRID
        return type(model)(config).eval()

    def residuals(model: nn.Module) -> list[bool]:
        return [bool(getattr(m, "use_residual", False)) for m in model.modules()]

    assert 50 <= steps < 500
    assert measure(built(steps), example).macs <= goal
    assert residuals(built(steps)) == residuals(model)
    above = built(steps + 1)
    assert measure(above, example).macs > goal or residuals(above) != residuals(model)
    assert widths.fit(0.0, "macs") >= 50  # none meets it: the floor's, 0.1 × 0.5, or above


def test_keeps_each_layer_s_highest_scoring_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stem's filter c scores c + 1 (everything else 0): the filters kept are its last
    (a quarter of the MACs: at half, `make_divisible` rounds the stem's 16 filters back up)."""
    model = _model("mobilenet_v2")
    stem: Any = model.mobilenet_v2.conv_stem.first_conv.convolution
    filters = stem.weight.detach().clone()
    ranks = torch.arange(1, filters.shape[0] + 1, dtype=torch.float64)
    use_fixed_scores(monkeypatch, {stem.weight: ranks.view(-1, 1, 1, 1).expand(filters.shape)})
    example = inputs_of(_batches(1, 16)[0])

    prune_(
        model,
        example,
        [],
        classification_loss,
        PruneConfig(method=FIXED, target=0.25, steps=1, global_ranking=False),
    )

    kept = stem.out_channels
    assert kept < filters.shape[0]
    torch.testing.assert_close(stem.weight.detach(), filters[-kept:], rtol=0, atol=0)


def test_a_goal_under_the_floor_multiplier_is_refused_with_what_it_reaches() -> None:
    model = _model("mobilenet_v2")
    example = inputs_of(_batches(1, 16)[0])
    floor = MultipliedWidths(model, measure(model, example), floor=0.1)
    config = copy.deepcopy(model.config)
    config.depth_multiplier = floor.fit(0.0, "macs") / GRID
    lowest = measure(type(model)(config).eval(), example).macs / measure(model, example).macs

    with pytest.raises(TargetUnreachable) as refused:
        prune_(
            model,
            example,
            _batches(1, 16),
            classification_loss,
            PruneConfig(method="magnitude", target=lowest / 2, global_ranking=False),
        )

    assert refused.value.reachable == pytest.approx(lowest, abs=1e-9)
