"""A scoring method whose scores the test states, so what pruning removes can be worked out
independently of any real scorer."""

import pytest
import torch
from torch import Tensor, nn

from worker.engine import scores as scores_module
from worker.engine.scores import LossFn, register_scorer

FIXED = "fixed"


def use_fixed_scores(monkeypatch: pytest.MonkeyPatch, scores: dict[nn.Parameter, Tensor]) -> None:
    """Make `FIXED` a method (for this test only) that scores each parameter as `scores` says,
    and zero where it says nothing. Data-free: it is called once per scoring."""
    monkeypatch.setattr(scores_module, "_SCORERS", dict(scores_module._SCORERS))

    def fixed(
        model: nn.Module,
        params: list[nn.Parameter],
        batch: object,
        loss_fn: LossFn,
        generator: torch.Generator,
    ) -> list[Tensor]:
        return [scores.get(p, torch.zeros(p.shape, dtype=torch.float64)) for p in params]

    register_scorer(FIXED, fixed, needs_data=False)
