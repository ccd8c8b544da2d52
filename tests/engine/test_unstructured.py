"""Unstructured sparsity is exact, masks stay applied, 2:4 masks are valid."""

import pytest
import torch
from torch import nn

from tests.engine import models
from worker.engine import PruneConfig, prune_
from worker.engine.unstructured import eligible_weights, is_valid_n_m

CALIBRATION = models.classification_batches((8, 3, 8, 8), 3, 2, seed=2)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return models.ResidualCNN(width=8, in_channels=3)


def _zeros(weights: dict[str, nn.Parameter]) -> int:
    return sum(int((w == 0).sum()) for w in weights.values())


@pytest.mark.parametrize("method", ["oba", "obd", "magnitude"])
def test_global_sparsity_is_exact(method: str) -> None:
    model = _cnn()
    weights = eligible_weights(model, ())
    total = sum(w.numel() for w in weights.values())

    result = prune_(
        model,
        CALIBRATION[0][0],
        CALIBRATION,
        models.cross_entropy,
        PruneConfig(
            method=method, granularity="unstructured", target_metric="sparsity", target=0.7, steps=3
        ),
    )

    assert _zeros(eligible_weights(model, ())) == round(0.7 * total)
    assert result.sparsity == pytest.approx(round(0.7 * total) / total, abs=1e-12)
    assert all(mask.shape == weights[name].shape for name, mask in result.masks.items())


def test_per_layer_sparsity_is_exact_in_every_layer() -> None:
    model = _cnn()
    prune_(
        model,
        CALIBRATION[0][0],
        CALIBRATION,
        models.cross_entropy,
        PruneConfig(
            granularity="unstructured",
            target_metric="sparsity",
            target=0.5,
            steps=1,
            per_layer_sparsity=True,
        ),
    )

    for weight in eligible_weights(model, ()).values():
        assert int((weight == 0).sum()) == round(0.5 * weight.numel())


def test_masks_stay_applied_after_finetuning_and_ignored_layers_stay_dense() -> None:
    def perturb(model: nn.Module, step: int) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)

    model = _cnn()
    result = prune_(
        model,
        CALIBRATION[0][0],
        CALIBRATION,
        models.cross_entropy,
        PruneConfig(
            granularity="unstructured",
            target_metric="sparsity",
            target=0.6,
            steps=2,
            ignored_layers=("head",),
        ),
        finetune=perturb,
    )

    params = dict(model.named_parameters())
    for name, mask in result.masks.items():
        assert (params[name][~mask] == 0).all()
    assert "head.weight" not in result.masks
    assert (model.head.weight != 0).all()


def test_two_four_masks_are_valid() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 6 * 6, 3)
    )
    calibration = models.classification_batches((4, 3, 8, 8), 3, 2, seed=0)

    result = prune_(
        model,
        calibration[0][0],
        calibration,
        models.cross_entropy,
        PruneConfig(method="oba", granularity="2:4"),
    )

    assert result.dense_layers == ["0.weight"]  # 3 input channels: no 2:4 pattern
    assert set(result.masks) == {"2.weight", "4.weight"}
    for name, mask in result.masks.items():
        assert is_valid_n_m(mask, in_axis=1)
        weight = dict(model.named_parameters())[name]
        assert is_valid_n_m(weight != 0, in_axis=1)
    assert result.sparsity == pytest.approx(0.5)
