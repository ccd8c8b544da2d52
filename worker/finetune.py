"""Fine-tuning after pruning: plain AdamW epochs over the job's data."""

from typing import Any

import torch
from torch import Tensor, nn

from worker.engine.unstructured import apply_masks_
from worker.losses import LossFn


def finetune_(
    model: nn.Module,
    batches: list[dict[str, Any]],
    loss_fn: LossFn,
    epochs: int,
    lr: float,
    masks: dict[str, Tensor] | None = None,
) -> float:
    """Train `model` in place; returns the mean loss of the last epoch.

    `masks` (unstructured pruning) are re-applied after every step: pruned weights stay zero.
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    last = 0.0
    for _ in range(epochs):
        total = 0.0
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            if masks:
                apply_masks_(model, masks)
            total += float(loss.detach())
        last = total / max(len(batches), 1)
    model.eval()
    return last
