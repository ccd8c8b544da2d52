"""What a pruning run returns: the result, and a record of each step (progress and history)."""

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from worker.engine.plan import Plan


@dataclass(frozen=True)
class StepRecord:
    step: int
    macs: int
    params: int
    seconds_scoring: float
    seconds_pruning: float
    channels_removed: int  # blocks, for depth steps
    widths: dict[str, int]  # output channels of each group's root layer (depth: block count)
    seconds_recalibrating: float = 0.0  # BatchNorm statistics re-estimated after the removal
    # mean calibration loss as the step began, from its own scoring pass (None: data-free
    # scores, or a step that scores nothing): the loss after the step before it
    loss_before: float | None = None

    def metric(self, name: str) -> int:
        return self.macs if name == "macs" else self.params


@dataclass
class PruneResult:
    """The pruned model (the same object that was passed in, changed in place) and what happened."""

    model: nn.Module
    initial_macs: int
    initial_params: int
    macs: int
    params: int
    history: list[StepRecord]
    sparsity: float | None = None  # unstructured and 2:4: fraction of eligible weights zeroed
    masks: dict[str, Tensor] = field(default_factory=dict)  # True where a weight is kept
    dense_layers: list[str] = field(default_factory=list)  # 2:4: weights left dense (width % 4)
    plan: Plan = field(default_factory=Plan)  # replays channel pruning on the original model

    @property
    def config_updates(self) -> dict[str, Any]:
        """What was written to `model.config` (Hugging Face models)."""
        return self.plan.config_updates

    # False when the floors, ignored layers or unprunable parts stop short of the target
    target_met: bool = True
