"""Fine-tuning after pruning: plain AdamW epochs over the job's data."""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine.unstructured import apply_masks_
from worker.pipeline.losses import LossFn


def finetune_(
    model: nn.Module,
    batches: list[dict[str, Any]],
    loss_fn: LossFn,
    epochs: int,
    lr: float,
    masks: dict[str, Tensor] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> float:
    """Train `model` in place; returns the mean loss of the last epoch.

    `masks` (unstructured pruning) are re-applied after every step: pruned weights stay zero.
    `on_batch(epoch, batch)` runs after every step (progress; it may raise to stop).
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    last = 0.0
    for epoch in range(epochs):
        total = 0.0
        for index, batch in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            if masks:
                apply_masks_(model, masks)
            total += float(loss.detach())
            if on_batch is not None:
                on_batch(epoch, index)
        last = total / max(len(batches), 1)
    model.eval()
    return last
