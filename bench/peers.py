"""Torch-Pruning 1.6.1's criteria as the benchmarks run them beside the engine: the peers."""

from __future__ import annotations

import torch_pruning as tp
from torch import Tensor, nn

# Torch-Pruning's `max_pruning_ratio` stops shrinking a layer once it is under (1 - ratio) of its
# initial width, the closest it has to the engine's 10% `layer_floor`.
PEER_MAX_PRUNING_RATIO = 0.9


class FixedHessianImportance(tp.importance.HessianImportance):
    """Torch-Pruning's OBD criterion with its gradient accumulation fixed.

    In 1.6.1 `accumulate_grad` checks `name not in self._accu_grad` but stores under the
    parameter, so the check is always true and every call overwrites the sum: only the last
    sample's squared gradient survives. Here the dictionaries are keyed by parameter throughout.
    `accumulate_squared` adds a batch of per-sample gradients at once (computed with
    `torch.func.vmap`, the same numbers as one backward per sample, about 7× faster on CPU).
    """

    def accumulate_grad(self, model: nn.Module) -> None:
        for param in model.parameters():
            if param.grad is not None:
                self._add(param, param.grad.detach().pow(2), 1)

    def accumulate_squared(self, per_sample: dict[nn.Parameter, Tensor]) -> None:
        for param, grads in per_sample.items():
            self._add(param, grads.pow(2).sum(0), grads.shape[0])

    def _add(self, param: nn.Parameter, squared: Tensor, count: int) -> None:
        if param in self._accu_grad:
            self._accu_grad[param] += squared
            self._counter[param] += count
        else:
            self._accu_grad[param] = squared.clone()
            self._counter[param] = count


def peer_importance(name: str) -> tp.importance.Importance:
    """A fresh importance for peer `name` (`tp_magnitude`, `tp_taylor`, `tp_hessian`, `tp_lamp`)."""
    return {
        "tp_magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
        "tp_taylor": tp.importance.TaylorImportance,
        "tp_hessian": FixedHessianImportance,
        "tp_lamp": lambda: tp.importance.LAMPImportance(p=2),
    }[name]()
