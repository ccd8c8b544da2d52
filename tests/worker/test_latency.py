"""Latency targets: the rounds prune until the measured time is under the target, report what
they measured, and fail with the fastest time reached when the floors allow no more. The clock
is replaced by one proportional to the MACs (a test that timed real runs would be a flaky
benchmark; bench/latency_target.py measures real ones)."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from service.jobs.results import Latency
from tests.worker import factories
from worker.engine import measure
from worker.pipeline import latency
from worker.pipeline.latency import Timing
from worker.pipeline.steps import JobFailed

CPU = torch.device("cpu")


def macs_clock(model: nn.Module, inputs: dict[str, Any]) -> Timing:
    """1 ms per 100k MACs of the batch, with a fixed 0.01 ms spread."""
    return Timing(measure(model, inputs).macs / 1e5, 0.01)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency, "time_forward", macs_clock)


def _job(tmp_path: Path, target_ms: float, batch: int) -> Latency:
    spec = factories.spec(target={"latency_ms": target_ms, "batch": batch})
    result = factories.run_bert_job(tmp_path, spec)
    assert result.latency is not None
    assert result.seconds["score"] == pytest.approx(
        sum(step.seconds_scoring for step in result.steps), abs=1e-3
    )  # every round's scoring counts in the job's time
    return result.latency


def test_a_latency_target_prunes_until_the_measured_time_is_under_it(
    clock: None, tmp_path: Path
) -> None:
    before = _job(tmp_path / "probe", 5e5, 4).before_ms  # already under: no round

    timing = _job(tmp_path, 0.6 * before, 4)

    assert timing.before_ms == pytest.approx(before)
    assert timing.after_ms <= 0.6 * before and timing.batch == 4
    assert timing.speedup == pytest.approx(before / timing.after_ms)
    assert timing.macs_ratio <= 0.6 and timing.rounds
    assert timing.rounds[-1].latency_ms == timing.after_ms


def test_every_rounds_scoring_counts_in_the_jobs_time(clock: None, tmp_path: Path) -> None:
    before = _job(tmp_path / "probe", 5e5, 4).before_ms

    timing = _job(tmp_path, 0.4 * before, 4)  # a round cuts at most half: two rounds or more

    assert len(timing.rounds) > 1  # and `_job` checked the scoring time of each


def test_a_latency_the_floors_cannot_reach_fails_with_the_fastest_time(
    clock: None, tmp_path: Path
) -> None:
    with pytest.raises(JobFailed, match="fastest this model ran here was") as failure:
        _job(tmp_path, 1e-6, 1)

    assert failure.value.code == "target_unreachable"


def test_widths_round_to_a_multiple_only_when_the_device_rewards_it() -> None:
    def cliff(model: nn.Module, inputs: dict[str, Any]) -> Timing:  # odd widths cost double
        width = model.linear.out_features
        return Timing(2.0 if width % 16 else 1.0, 0.01)

    assert latency.choose_round_to(CPU, 4, cliff) == 16
    assert latency.choose_round_to(CPU, 4, macs_clock) is None  # a smooth cost: no rounding


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Scripted(nn.Module):
    """Each forward pass takes the next of `seconds` on `clock`."""

    def __init__(self, clock: FakeClock, seconds: list[float]) -> None:
        super().__init__()
        self.clock, self.seconds = clock, iter(seconds)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self.clock.now += next(self.seconds)
        return input


def test_a_timing_is_the_median_and_half_the_interquartile_range_after_warm_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(latency, "time", clock)
    warm_up = [0.5, 0.5]  # left out: counted, they would move the median to 4 ms
    runs = [0.003, 0.001, 0.004, 0.001, 0.005, 0.009, 0.002]

    timing = latency.time_forward(
        Scripted(clock, warm_up + runs), {"input": torch.zeros(1)}, warmup=2, runs=7
    )

    # sorted, the runs are 1 1 2 3 4 5 9 ms: the median is the 4th, the quartiles the 2nd and 6th
    assert timing.median_ms == pytest.approx(3.0)
    assert timing.noise_ms == pytest.approx((5.0 - 1.0) / 2)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """On a busy machine two torch threads wait for each other a scheduler slice per pass (20 ms
    for a tiny one here, whatever its work); one thread times the pass itself."""
    count = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(count)


def test_a_real_timing_grows_with_the_work_of_the_pass(one_thread: None) -> None:
    """512 times the rows through one layer: the median must be clearly longer. The margin is
    far below the ratio of the work (about 200 measured), so a busy machine does not flip it; a
    timer that measured something other than the passes (nothing, the warm-up, a constant)
    does."""
    layer = nn.Linear(256, 256)
    light = latency.time_forward(layer, {"input": torch.randn(2, 256)}, warmup=2, runs=9)
    heavy = latency.time_forward(layer, {"input": torch.randn(1024, 256)}, warmup=2, runs=9)

    assert heavy.median_ms > 5 * light.median_ms


def test_a_timed_batch_repeats_the_example_row() -> None:
    assert latency.rows_of({"input_ids": torch.ones(1, 5)}, 3)["input_ids"].shape == (3, 5)
