"""Latency targets: the rounds prune until the measured time is under the target, report what
they measured, and fail with the fastest time reached when the floors allow no more. The clock
is replaced by one proportional to the MACs (a test that timed real runs would be a flaky
benchmark; bench/latency_target.py measures real ones)."""

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.worker import factories
from worker import latency
from worker.engine import measure
from worker.latency import Timing
from worker.steps import JobFailed, JobFiles, execute

CPU = torch.device("cpu")


def macs_clock(model: nn.Module, inputs: dict[str, Any]) -> Timing:
    """1 ms per 100k MACs of the batch, with a fixed 0.01 ms spread."""
    return Timing(measure(model, inputs).macs / 1e5, 0.01)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency, "time_forward", macs_clock)


def _job(tmp_path: Path, target_ms: float, batch: int) -> dict[str, Any]:
    spec = factories.spec(target={"latency_ms": target_ms, "batch": batch})
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    files = JobFiles(
        factories.bert_folder(tmp_path),
        "hf",
        factories.tensors_file(tmp_path / "data.safetensors"),
        "tensors",
        None,
        work,
    )
    result, _ = execute(spec, files, CPU, False, lambda _: None)
    return result


def test_a_latency_target_prunes_until_the_measured_time_is_under_it(
    clock: None, tmp_path: Path
) -> None:
    before = _job(tmp_path / "probe", 5e5, 4)["latency"]["before_ms"]  # already under: no round

    timing = _job(tmp_path, 0.6 * before, 4)["latency"]

    assert timing["before_ms"] == pytest.approx(before)
    assert timing["after_ms"] <= 0.6 * before and timing["batch"] == 4
    assert timing["speedup"] == pytest.approx(before / timing["after_ms"])
    assert timing["macs_ratio"] <= 0.6 and timing["rounds"]
    assert [r["latency_ms"] for r in timing["rounds"]][-1] == timing["after_ms"]


def test_every_rounds_scoring_counts_in_the_jobs_time(clock: None, tmp_path: Path) -> None:
    before = _job(tmp_path / "probe", 5e5, 4)["latency"]["before_ms"]

    result = _job(tmp_path, 0.4 * before, 4)  # a round cuts at most half: two rounds or more

    assert len(result["latency"]["rounds"]) > 1
    assert result["seconds"]["score"] == pytest.approx(
        sum(step["seconds_scoring"] for step in result["steps"]), abs=1e-3
    )


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


def test_a_real_timing_has_a_median_and_a_spread() -> None:
    timing = latency.time_forward(nn.Linear(8, 8), {"input": torch.zeros(2, 8)}, warmup=1, runs=5)

    assert timing.median_ms > 0 and timing.noise_ms >= 0
    assert latency.rows_of({"input_ids": torch.ones(1, 5)}, 3)["input_ids"].shape == (3, 5)
