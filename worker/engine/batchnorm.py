"""BatchNorm recalibration after structural pruning.

Removing channels shifts the statistics every later BatchNorm sees; with stale running
statistics a pruned CNN sits near chance whatever the criterion. Re-estimating them on a few
calibration batches (forward only, no weight update) restores it.
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine.modes import eval_mode


def recalibrate_batchnorm_(
    model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]
) -> bool:
    """Re-estimate running mean/var of every BatchNorm as an exact average over `batches`.

    The batches drive the forward pass through `loss_fn` (its value is ignored). Only BatchNorm
    layers are put in training mode: dropout and the rest stay in eval mode. Returns False when
    the model has no BatchNorm.
    """
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return False
    momenta = {m: m.momentum for m in norms}
    with eval_mode(model):
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative moving average: every batch weighs the same
            norm.train()
        try:
            with torch.no_grad():
                for batch in batches:
                    loss_fn(model, batch)
        finally:
            for norm, momentum in momenta.items():
                norm.momentum = momentum
    return True
