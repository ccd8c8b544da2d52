"""What each pruning step did, for progress reports and results."""

from dataclasses import dataclass


@dataclass(frozen=True)
class StepRecord:
    step: int
    macs: int
    params: int
    seconds_scoring: float
    seconds_pruning: float
    channels_removed: int  # blocks, for depth steps
    widths: dict[str, int]  # output channels of each group's root layer (depth: block count)
