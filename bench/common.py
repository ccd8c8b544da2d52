"""Shared pieces of the benchmarks: offline data sets, small BatchNorm CNNs, training and tables.

Everything here runs offline and on a CPU in seconds: scikit-learn's `load_digits` (8×8 digit
images) and MNIST-1D built procedurally by the `mnist1d` package (its `get_dataset()` downloads
and is never called). Every random choice takes an explicit seed so a run can be repeated.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.engine import measure
from worker.engine.batchnorm import recalibrate_batchnorm_
from worker.runtime import threads

DATASETS = ("digits", "mnist1d")
Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Dataset:
    """Float inputs shaped for the dataset's CNN (N, 1, 8, 8) or (N, 1, 40), integer labels."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: int = 10
    # training rows set aside (`split_validation`): no dense training, calibration or recovery
    # sees them
    validation: Batch | None = None

    @property
    def example(self) -> Tensor:
        """One input, for tracing the dependency graph and counting MACs (batch 1)."""
        return self.x_train[:1]


def set_threads(count: int) -> None:
    """Pin torch to `count` CPU threads, as a worker does (`worker/runtime/threads.py`): the
    machine is small and shared with other jobs."""
    threads.use(count)
    with contextlib.suppress(RuntimeError):  # already set once in this process
        torch.set_num_interop_threads(1)


def load_dataset(name: str) -> Dataset:
    """`digits`: 1797 images, a fixed stratified 1297/500 train/test split, scaled to [0, 1].

    `mnist1d`: the default MNIST-1D (4000 train / 1000 test sequences of length 40), built from
    its templates with the package's default seed, standardised with training statistics.
    """
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        idx_train, idx_test = train_test_split(
            torch.arange(len(y)).numpy(), test_size=500, stratify=y.numpy(), random_state=0
        )
        return Dataset(name, x[idx_train], y[idx_train], x[idx_test], y[idx_test])
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())
        x_train = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
        x_test = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
        mean, std = x_train.mean(), x_train.std()
        return Dataset(
            name,
            (x_train - mean) / std,
            torch.tensor(data["y"], dtype=torch.long),
            (x_test - mean) / std,
            torch.tensor(data["y_test"], dtype=torch.long),
        )
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


def _block(conv: type[nn.Module], norm: type[nn.Module], c_in: int, c_out: int, k: int) -> list:
    return [conv(c_in, c_out, k, padding=k // 2, bias=False), norm(c_out), nn.ReLU()]


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU layers, two poolings, global average pooling and a linear classifier.

    Widths double where resolution halves, so the layers cost MACs of the same order and a
    criterion has real choices to make. `dims` is 2 for images, 1 for sequences.
    """

    def __init__(self, dims: int, widths: Sequence[int] = (32, 32, 64, 64), classes: int = 10):
        super().__init__()
        conv, norm, pool = (
            (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
            if dims == 2
            else (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
        )
        first_kernel = 3 if dims == 2 else 5
        w1, w2, w3, w4 = widths
        self.features = nn.Sequential(
            *_block(conv, norm, 1, w1, first_kernel),
            *_block(conv, norm, w1, w2, 3),
            pool(2),
            *_block(conv, norm, w2, w3, 3),
            *_block(conv, norm, w3, w4, 3),
            pool(2),
        )
        self.classifier = nn.Linear(w4, classes)
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        return self.classifier(features.flatten(2).mean(dim=2))


def build_model(dataset: str, seed: int) -> SmallCNN:
    """An untrained CNN for `dataset` with weights drawn from `seed`."""
    torch.manual_seed(seed)
    return SmallCNN(dims=2 if dataset == "digits" else 1)


def cross_entropy(model: nn.Module, batch: Batch) -> Tensor:
    """The loss every criterion is given: mean cross-entropy of a labelled batch."""
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def _shuffled_batches(data: Dataset, batch_size: int, generator: torch.Generator) -> list[Batch]:
    order = torch.randperm(len(data.y_train), generator=generator)
    return [
        (data.x_train[idx], data.y_train[idx]) for idx in order.split(batch_size) if len(idx) > 1
    ]


def train_epochs(
    model: nn.Module, data: Dataset, epochs: int, lr: float, seed: int, batch_size: int = 64
) -> None:
    """Adam with cosine-decayed `lr` over `epochs` passes of shuffled mini-batches (train mode)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(data.y_train) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    for _ in range(epochs):
        for batch in _shuffled_batches(data, batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            cross_entropy(model, batch).backward()
            optimizer.step()
            schedule.step()
    model.eval()


FINETUNE_LR = 1e-3


def finetune_one_epoch(model: nn.Module, data: Dataset, seed: int) -> None:
    """The fine-tuning every pruned model gets: one epoch of Adam at a constant 1e-3."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=FINETUNE_LR)
    model.train()
    for batch in _shuffled_batches(data, 64, generator):
        optimizer.zero_grad(set_to_none=True)
        cross_entropy(model, batch).backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset) -> float:
    """Top-1 accuracy on the held-out test split, in eval mode."""
    model.eval()
    predictions = torch.cat([model(x).argmax(1) for x in data.x_test.split(500)])
    return float((predictions == data.y_test).float().mean())


def calibration_batches(data: Dataset, seed: int, count: int = 8, size: int = 64) -> list[Batch]:
    """`count` batches of `size` training examples drawn without replacement from `seed`.

    Every criterion (ours and the peers) scores and recalibrates on exactly these batches.
    """
    order = _calibration_order(data, seed)[: count * size]
    return [(data.x_train[idx], data.y_train[idx]) for idx in order.split(size)]


def split_validation(data: Dataset, fraction: float) -> Dataset:
    """`data` with a fixed random `fraction` of its training rows moved to `validation`: rows
    the dense model never trains on, as a user's validation set would be (the same rows for
    every seed)."""
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(30_000))
    cut = round(fraction * len(order))
    kept, aside = order[cut:], order[:cut]
    return replace(
        data,
        x_train=data.x_train[kept],
        y_train=data.y_train[kept],
        validation=(data.x_train[aside], data.y_train[aside]),
    )


def held_out_batch(data: Dataset, seed: int, count: int = 8, size: int = 64) -> Batch:
    """The training examples `calibration_batches(data, seed, count, size)` did not draw, as
    one batch: rows that neither scoring nor recalibration saw (dense training saw every
    training row; the test split stays for the tables). With a validation split, those rows
    instead: dense training never saw them either."""
    if data.validation is not None:
        return data.validation
    idx = _calibration_order(data, seed)[count * size :]
    return data.x_train[idx], data.y_train[idx]


def _calibration_order(data: Dataset, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(20_000 + seed)
    return torch.randperm(len(data.y_train), generator=generator)


def recalibrate(model: nn.Module, batches: Iterable[Batch]) -> None:
    """Re-estimate BatchNorm running statistics on `batches` (the engine's own routine)."""
    recalibrate_batchnorm_(model, batches, cross_entropy)


def macs(model: nn.Module, example: Any) -> int:
    """MACs of one forward pass on `example`, as the engine counts them (worker.engine.cost)."""
    return measure(model, example).macs


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """`mean ± std` (sample std; just the mean for one value), scaled (100 for percent)."""
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
