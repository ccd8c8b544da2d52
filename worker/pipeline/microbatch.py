"""Calibration batches split into micro-batches when scoring a whole batch would not fit.

Scoring's memory grows with the rows of a pass: the double backward keeps several tensors per
activation of the forward pass. The worker measures what one row's forward pass saves for
backward (autograd's saved tensors, parameters excluded), prices a pass of n rows as the
parameter copies of `memory.scoring_bytes` plus `ACTIVATION_FACTOR` × n × that, and splits each
batch into as few, as even micro-batches as the budget allows. The engine averages scores over
the batches it is given, so for a loss that is a mean over rows the scores are those of the
whole batch, up to rows split one apart (exact when the batch size divides evenly).
"""

import math
import sys
from typing import Any

import torch
from torch import Tensor

from worker.engine.modes import eval_mode
from worker.pipeline import memory
from worker.pipeline.losses import LossFn

# Scoring's peak working memory (less one copy of the weights) over the rows' saved tensors,
# measured on bench/scoring_cost.py's models at batch 32: ResNet-18 2.26, ResNet-20 2.11, the
# ViT 2.37; with a margin.
ACTIVATION_FACTOR = 3


def saved_bytes_per_row(net: torch.nn.Module, loss_fn: LossFn, batch: dict[str, Any]) -> int:
    """Bytes one row's forward pass (and loss) keeps for backward, parameters excluded."""
    row = {k: v[:1] if isinstance(v, Tensor) else v for k, v in batch.items()}
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), eval_mode(net):
        loss_fn(net, row)
    return sum(saved.values())


def rows_per_pass(net: torch.nn.Module, loss_fn: LossFn, batch: dict[str, Any], budget: int) -> int:
    """The most rows of `batch` one scoring pass may take within `budget` bytes; raises
    OutOfMemory with the figure when not even one row fits."""
    fixed = memory.scoring_bytes(net)
    per_row = ACTIVATION_FACTOR * saved_bytes_per_row(net, loss_fn, batch)
    if fixed + per_row > budget:
        raise memory.OutOfMemory(
            f"scoring even one row needs about {memory.readable(fixed + per_row)} (weights, "
            f"gradients and products {memory.readable(fixed)}, one row's activations "
            f"{memory.readable(per_row)}); the job may use {memory.readable(budget)}. Raise "
            "calibration.max_memory, shorten the rows, or use a worker with more memory"
        )
    if not per_row:  # nothing kept per row: any number fits
        return sys.maxsize
    return max(1, (budget - fixed) // per_row)


def split(batches: list[dict[str, Any]], rows: int) -> list[dict[str, Any]]:
    """Every batch in as few micro-batches of at most `rows` rows as it takes, sized evenly."""
    out = []
    for batch in batches:
        size = next(v.shape[0] for v in batch.values() if isinstance(v, Tensor))
        pieces = math.ceil(size / rows)
        if pieces <= 1:
            out.append(batch)
            continue
        parts = {
            k: v.tensor_split(pieces) if isinstance(v, Tensor) else [v] * pieces
            for k, v in batch.items()
        }
        out += [{k: parts[k][i] for k in batch} for i in range(pieces)]
    return out
