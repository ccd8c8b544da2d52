"""Latency targets: prune until the model answers under X ms on this worker's device, with the
job's input shape at the job's batch size, measured (not estimated) as it prunes.

Each round times the model (warm-up, then the median of repeated runs; the noise floor is half
the interquartile range), predicts from the MACs how far the next round must go (time follows
arithmetic roughly; a round takes at least 5% and at most half of what is left), prunes that
far, and times again. It stops at the first model under the target, or at the fastest latency
reached when the floors allow no more (the job then fails with it). Widths round to the multiple
the device runs fastest, chosen by timing a layer at a width one under that multiple and at the
multiple.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from worker.engine import PruneConfig, PruneResult, StepRecord, TargetUnreachable, measure, prune_
from worker.engine.cost import run_forward
from worker.engine.plan import Plan
from worker.pipeline.losses import LossFn

MAX_ROUNDS = 30
SMALLEST_CUT, LARGEST_CUT = 0.95, 0.5  # MACs kept per round, at most and at least
ROUND_TO_CANDIDATES = (16, 8)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    noise_ms: float  # half the interquartile range of the runs


Timer = Callable[[nn.Module, dict[str, Any]], Timing]


def time_forward(
    model: nn.Module, inputs: dict[str, Any], warmup: int = 5, runs: int = 30
) -> Timing:
    """The median and spread of one forward pass (eval mode, no autograd), in milliseconds."""
    model.eval()
    timings = []
    with torch.inference_mode():
        for index in range(warmup + runs):
            _synchronize()
            started = time.perf_counter()
            run_forward(model, inputs)
            _synchronize()
            if index >= warmup:
                timings.append(1000 * (time.perf_counter() - started))
    quartiles = statistics.quantiles(timings, n=4)
    return Timing(statistics.median(timings), (quartiles[2] - quartiles[0]) / 2)


def rows_of(example: dict[str, Any], rows: int) -> dict[str, Any]:
    """The example (one row) as a batch of `rows`, for timing at the job's batch size."""
    return {
        key: value.expand(rows, *value.shape[1:]).contiguous()
        if isinstance(value, torch.Tensor) and value.dim() > 0
        else value
        for key, value in example.items()
    }


def choose_round_to(device: torch.device, rows: int, timer: Timer | None = None) -> int | None:
    """The channel multiple that runs fastest here: a layer one channel short of a multiple
    must be clearly slower (past the noise) than one at it, else widths are not rounded."""
    timer = timer or time_forward
    for multiple in ROUND_TO_CANDIDATES:
        width = 16 * multiple
        inputs = {"input": torch.randn(rows, 256, device=device)}
        at = timer(_Layer(256, width).to(device), inputs)
        short = timer(_Layer(256, width - 1).to(device), inputs)
        if short.median_ms > at.median_ms + 2 * max(at.noise_ms, short.noise_ms, 1e-3):
            return multiple
    return None


@dataclass
class Reached:
    """Where the rounds ended: the engine's last result (the plan: every round's in one)."""

    result: PruneResult
    report: dict[str, Any] = field(default_factory=dict)


def prune_to_latency(
    net: nn.Module,
    example: dict[str, Any],
    calibration: list[Any],
    loss_fn: LossFn,
    configure: Callable[[float, int | None], PruneConfig],
    target_ms: float,
    rows: int,
    round_to: int | None,
    on_step: Callable[[StepRecord], None] | None = None,
    timer: Timer | None = None,
) -> Reached:
    """Prune `net` in place, round by round, until it runs under `target_ms` at `rows` rows.
    `configure(kept, round_to)` is the job's engine config for keeping `kept` of the MACs."""
    timer = timer or time_forward
    inputs = rows_of(example, rows)
    before = timer(net, inputs)
    start = measure(net, example)
    result = PruneResult(net, start.macs, start.params, start.macs, start.params, [])
    plan, now = Plan(), before
    rounds: list[dict[str, float]] = []
    history: list[StepRecord] = []  # every round's steps: the job reports (and times) them all
    while now.median_ms > target_ms and len(rounds) < MAX_ROUNDS:
        cut = min(SMALLEST_CUT, max(LARGEST_CUT, target_ms / now.median_ms))
        try:
            step = prune_(net, example, calibration, loss_fn, configure(cut, round_to), on_step)
        except TargetUnreachable:
            break  # the floors allow no more
        plan = plan.then(step.plan)
        history += step.history
        result = PruneResult(net, start.macs, start.params, step.macs, step.params, history)
        now = timer(net, inputs)
        rounds.append({"macs_kept": step.macs / start.macs, "latency_ms": now.median_ms})
        if not step.target_met:
            break
    result.plan = plan
    report = {
        "target_ms": target_ms,
        "batch": rows,
        "before_ms": before.median_ms,
        "after_ms": now.median_ms,
        "noise_ms": now.noise_ms,
        "speedup": before.median_ms / now.median_ms,
        "macs_ratio": result.macs / start.macs,
        "round_to": round_to,
        "rounds": rounds,
    }
    return Reached(result, report)


class _Layer(nn.Module):
    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(inputs, outputs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.linear(input)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
