"""A job's `target_met` is what it measured against what it was asked for, for every member of a
family, and a job that misses its target fails as `target_unreachable`: it never succeeds, and
writes no model for the target it missed."""

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select
from torch import nn

from service.core.db import get_sessionmaker
from service.core.orm import Artifact, Job
from service.jobs.results import JobResult
from service.jobs.schemas import JobError, Target
from tests.worker import factories
from tests.worker.stored import stored_bert, stored_job
from worker.engine import PruneConfig, PruneResult, TargetUnreachable, prune_
from worker.pipeline import steps
from worker.pipeline.steps import JobFailed
from worker.runtime import lifecycle

CPU = torch.device("cpu")


def _execute(tmp_path: Path, *, unchecked: dict[str, Any] | None = None, **spec: Any) -> JobResult:
    """Run a job of `spec`; `unchecked` fields are set past the spec's validation (a spec the
    API refuses at submit, to reach the job's own guard)."""
    # magnitude scores: what is measured against the target does not depend on the method
    job = factories.spec(**{"method": "magnitude"} | spec).model_copy(update=unchecked or {})
    return factories.run_bert_job(tmp_path, job)


def _falling_short(monkeypatch: pytest.MonkeyPatch, *, from_call: int = 1) -> None:
    """From its `from_call`th call on, the engine is asked to keep 0.95 of the model it is given:
    it meets the target it was given (its own `target_met` holds), not the job's."""
    calls: list[None] = []

    def short(
        net: nn.Module, example: Any, batches: Any, loss: Any, config: PruneConfig, **kwargs: Any
    ) -> PruneResult:
        calls.append(None)
        if len(calls) >= from_call:
            config = replace(config, target=0.95)
        result = prune_(net, example, batches, loss, config, **kwargs)
        assert result.target_met
        return result

    monkeypatch.setattr(steps, "prune_", short)


@pytest.mark.parametrize(
    "change",
    [
        {"target": {"macs": 0.5}},
        {"target": {"params": 0.7}},
        {"granularity": "unstructured", "target": {"sparsity": 0.7}},
        {"granularity": "2:4", "target": {"sparsity": 0.5}},
    ],
    ids=["macs", "params", "sparsity", "2:4"],
)
def test_a_job_under_its_target_reports_it_met(tmp_path: Path, change: dict[str, Any]) -> None:
    result = _execute(tmp_path, **change)

    goal = factories.spec(**change).target
    if goal.metric == "sparsity":
        assert (result.sparsity or 0) >= goal.value
    else:
        after = getattr(result, f"{goal.metric}_after")
        assert after <= goal.value * getattr(result, f"{goal.metric}_before")
    assert result.target_met is True


def test_each_member_of_a_family_meets_its_own_target(tmp_path: Path) -> None:
    result = _execute(tmp_path, targets=[{"macs": 0.8}, {"macs": 0.55}])

    for member, goal in zip(result.family or [], (0.8, 0.55), strict=True):
        assert member.macs_after <= goal * result.macs_before
        assert member.target_met is True
    assert result.target_met is True


def test_a_job_that_falls_short_fails_with_what_it_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _falling_short(monkeypatch)

    with pytest.raises(TargetUnreachable) as missed:
        _execute(tmp_path, target={"macs": 0.5})

    assert missed.value.code == "target_unreachable"
    assert missed.value.metric == "macs" and missed.value.target == 0.5
    assert 0.5 < missed.value.reachable <= 0.95
    assert not list((tmp_path / "work").rglob("*.zip"))  # nothing exported for a miss


def test_a_family_member_that_falls_short_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _falling_short(monkeypatch, from_call=2)  # the first member meets 0.8, the second misses

    with pytest.raises(TargetUnreachable) as missed:
        _execute(tmp_path, targets=[{"macs": 0.8}, {"macs": 0.55}])

    assert missed.value.metric == "macs" and missed.value.target == 0.55
    assert 0.55 < missed.value.reachable <= 0.8
    assert [p.name for p in (tmp_path / "work").rglob("*.zip")] == ["model-hf.macs-0.8.zip"]


def test_a_2_4_job_asked_for_more_than_half_fails_with_the_half_it_zeroed(
    tmp_path: Path,
) -> None:
    """The API refuses this spec at submit; the job's guard holds without that."""
    more_than_half = {"target": Target(sparsity=0.7)}

    with pytest.raises(JobFailed, match=r"2:4 pruning zeroed 0\.5000 .* target 0\.7") as missed:
        _execute(tmp_path, granularity="2:4", target={"sparsity": 0.5}, unchecked=more_than_half)

    assert missed.value.code == "target_unreachable"


def test_a_job_that_falls_short_is_failed_never_succeeded(
    tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_id = stored_bert(tenant, tmp_path)
    lifecycle.validate_model(model_id)
    job_id = stored_job(tenant, model_id, tmp_path, factories.spec().model_dump(mode="json"))
    _falling_short(monkeypatch)

    lifecycle.run_job(job_id)

    with get_sessionmaker()() as session:
        job = session.get_one(Job, job_id)
        artifacts = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
    assert job.state == "failed" and job.result is None and not artifacts
    assert job.error is not None and job.error["code"] == "target_unreachable"
    assert job.error["message"].startswith("a macs target of 0.5 cannot be reached")
    # what it can reach is a field, not only words in the message (an SDK reads it as is)
    error = JobError.model_validate(job.error)
    assert error.metric == "macs" and error.reachable is not None and 0.5 < error.reachable < 1
    assert f"{error.reachable:.4f}" in error.message
