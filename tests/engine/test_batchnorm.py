"""BatchNorm recalibration gives the statistics of the calibration data, computed directly.

docs/engine.md: recalibration re-estimates running statistics exactly, as a cumulative average
(every batch weighs the same) over the calibration batches, with dropout off. During the pass
each BatchNorm normalises with its batch's statistics (training mode), so what a later one sees
depends on that; the oracle below runs the network by hand the same way.
"""

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tests.engine import models
from worker.engine import PruneConfig, prune_
from worker.engine.batchnorm import recalibrate_batchnorm_

Statistics = dict[str, tuple[Tensor, Tensor]]  # BatchNorm name -> (running mean, running var)


def _network() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),  # on, it would change every later statistic
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).double()
    models.randomise_batchnorm_(model, torch.Generator().manual_seed(1))  # stale statistics,
    for norm in _norms(model).values():  # as from a long training
        norm.num_batches_tracked.fill_(1000)
    return model


def _calibration() -> list[tuple[Tensor, Tensor]]:
    """Batches of different sizes and offsets: a sample-weighted or exponential average, or
    one batch alone, would each give other statistics."""
    generator = torch.Generator().manual_seed(2)
    return [
        (
            offset + torch.randn(size, 3, 6, 6, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for size, offset in ((4, 0.0), (6, 1.5), (10, -0.7))
    ]


def _expected_statistics(model: nn.Sequential, batches: list[tuple[Tensor, Tensor]]) -> Statistics:
    """Per BatchNorm, the mean over batches of its input's batch mean and unbiased batch variance
    (over every axis but the channels'), running the layers by hand with dropout off."""
    per_batch: dict[str, list[tuple[Tensor, Tensor]]] = {}
    with torch.no_grad():
        for inputs, _ in batches:
            h = inputs
            for name, layer in model.named_children():
                if isinstance(layer, nn.Dropout):
                    continue
                if not isinstance(layer, _BatchNorm):
                    h = layer(h)
                    continue
                # (N, C, …) -> (C, N·…)
                rows = h.transpose(0, 1).reshape(h.shape[1], -1)
                mean, biased = rows.mean(1), rows.var(1, correction=0)
                per_batch.setdefault(name, []).append((mean, rows.var(1, correction=1)))
                shape = (1, -1) + (1,) * (h.dim() - 2)
                h = (h - mean.view(shape)) / (biased.view(shape) + layer.eps).sqrt()
                h = h * layer.weight.view(shape) + layer.bias.view(shape)
    return {
        name: (
            torch.stack([m for m, _ in stats]).mean(0),
            torch.stack([v for _, v in stats]).mean(0),
        )
        for name, stats in per_batch.items()
    }


def _norms(model: nn.Sequential) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_children() if isinstance(m, _BatchNorm)}


def _assert_running_statistics(model: nn.Sequential, expected: Statistics) -> None:
    norms = _norms(model)
    assert set(norms) == set(expected)
    for name, (mean, var) in expected.items():
        assert norms[name].running_mean is not None and norms[name].running_var is not None
        torch.testing.assert_close(norms[name].running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norms[name].running_var, var, rtol=1e-10, atol=1e-12)


def test_recalibration_gives_the_cumulative_statistics_of_the_calibration_batches() -> None:
    model = _network().train()
    norms = _norms(model)
    norms["5"].momentum = 0.3
    batches = _calibration()
    expected = _expected_statistics(model, batches)

    assert recalibrate_batchnorm_(model, batches, models.cross_entropy)

    _assert_running_statistics(model, expected)
    assert all(m.training for m in model.modules())  # the caller's modes come back
    assert [norm.momentum for norm in norms.values()] == [0.1, 0.3, 0.1]
    assert [norm.num_batches_tracked for norm in norms.values()] == [len(batches)] * 3


def test_a_model_without_batchnorm_is_left_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    batches = [(torch.randn(2, 4), torch.tensor([0, 1]))]

    assert not recalibrate_batchnorm_(model, batches, models.cross_entropy)


def test_structured_pruning_leaves_the_statistics_of_the_pruned_model() -> None:
    model = _network()
    batches = _calibration()

    prune_(
        model,
        batches[0][0],
        batches,
        models.cross_entropy,
        PruneConfig(method="magnitude", target=0.5, steps=2),
    )

    assert _norms(model)["1"].num_features < 8  # channels went: the old statistics no longer apply
    _assert_running_statistics(model, _expected_statistics(model, batches))
