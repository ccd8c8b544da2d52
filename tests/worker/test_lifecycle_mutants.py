"""What a job's claim, finish, end and the reaper write, in cases a mutation run of
`worker/runtime/lifecycle.py` found untested (issue 20, build item 7): the lease guards every final
write, a job's end is timed, its result keeps every stage's seconds, and a job the reaper
returns to the queue is sent once per period.

The steps are replaced by a stand-in (`lifecycle.execute`) that acts as the test says: the
lifecycle around them is what is under test, on a migrated SQLite database and a local store.
"""

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.core.db import get_sessionmaker
from service.core.orm import Artifact, Job
from service.core.settings import get_settings
from service.core.store import ArtifactStore, StoredBlob, get_store, store_file
from service.jobs import repository as jobs
from service.jobs.results import Progress
from service.jobs.states import JobState
from tests.worker import factories
from tests.worker.stored import stored_bert, stored_job
from worker.pipeline.export import Exported
from worker.pipeline.steps import JobFailed, JobFiles
from worker.runtime import lifecycle

Steps = Callable[..., tuple[dict[str, Any], list[Exported]]]
Act = Callable[[str, JobFiles, Callable[[Progress], None]], Any]


def _job(tenant: str, root: Path) -> str:
    return stored_job(
        tenant, stored_bert(tenant, root), root, factories.spec().model_dump(mode="json")
    )


def _stored(job_id: str) -> Job:
    with get_sessionmaker()() as session:
        return session.get_one(Job, job_id)


def _steps(job_id: str, act: Act, runs: list[str] | None = None) -> Steps:
    """A stand-in for `steps.execute` on `job_id` that calls `act(job_id, files, report)` and
    returns what it returns (a result and exports), or raises what it raises; each run is
    noted in `runs`."""

    def execute(
        spec: Any, files: JobFiles, device: Any, trusted: bool, report: Any, *rest: Any
    ) -> tuple[dict[str, Any], list[Exported]]:
        if runs is not None:
            runs.append(job_id)
        outcome: tuple[dict[str, Any], list[Exported]] = act(job_id, files, report)
        return outcome

    return execute


def _taken_over(job_id: str) -> None:
    """The reaper returned the job and another worker claimed it: the lease is someone else's."""
    with get_sessionmaker()() as session:
        session.get_one(Job, job_id).lease_owner = "other:1"
        session.commit()


def _exports(files: JobFiles) -> list[Exported]:
    path = files.work / "model.safetensors"
    path.write_bytes(b"weights")
    return [Exported("safetensors", path)]


def _fail(job_id: str, files: JobFiles, report: Callable[[Progress], None]) -> Any:
    raise JobFailed("target_unreachable", "the steps failed")


def _cancel(job_id: str, files: JobFiles, report: Callable[[Progress], None]) -> Any:
    with get_sessionmaker()() as session:  # as the API's cancel does
        assert jobs.transition(session, job_id, JobState.CANCELLING)
        session.commit()
    report(Progress(stage="pruning", percent=10))  # the next heartbeat sees it


def _succeed(job_id: str, files: JobFiles, report: Callable[[Progress], None]) -> Any:
    return factories.job_result(seconds={"load": 1.5, "prune": 2.5}), _exports(files)


@pytest.mark.parametrize(
    ("act", "state", "error"),
    [
        (_fail, "failed", {"code": "target_unreachable", "message": "the steps failed"}),
        (_cancel, "cancelled", None),
    ],
)
def test_a_job_that_ends_unsuccessfully_records_its_state_error_and_end_time(
    tenant: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    act: Callable[..., Any],
    state: str,
    error: dict[str, str] | None,
) -> None:
    job_id = _job(tenant, tmp_path)
    monkeypatch.setattr(lifecycle, "execute", _steps(job_id, act))

    lifecycle.run_job(job_id)

    ended = _stored(job_id)
    assert (ended.state, ended.error, ended.result) == (state, error, None)
    assert ended.started_at is not None and ended.finished_at is not None
    assert ended.started_at <= ended.finished_at


@pytest.mark.parametrize("outcome", [_fail, _succeed])
def test_a_worker_whose_lease_was_taken_over_leaves_the_job_to_its_new_owner(
    tenant: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    outcome: Callable[..., Any],
) -> None:
    """lifecycle.LeaseLost: the worker stops without touching the job, whether its steps failed
    or succeeded (then no artifact is recorded either)."""
    job_id = _job(tenant, tmp_path)

    def taken_over_then(job_id: str, files: JobFiles, report: Any) -> Any:
        _taken_over(job_id)
        return outcome(job_id, files, report)

    monkeypatch.setattr(lifecycle, "execute", _steps(job_id, taken_over_then))

    lifecycle.run_job(job_id)

    running = _stored(job_id)
    assert (running.state, running.lease_owner) == ("running", "other:1")
    assert (running.error, running.result, running.finished_at) == (None, None, None)
    with get_sessionmaker()() as session:
        assert session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []


def test_a_succeeded_job_keeps_every_stage_s_seconds_and_adds_the_store_s(
    tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/formats.md: `seconds` says where the job's time went, `store` (putting the
    artifacts) included."""
    job_id = _job(tenant, tmp_path)
    monkeypatch.setattr(lifecycle, "execute", _steps(job_id, _succeed))

    started = time.perf_counter()
    lifecycle.run_job(job_id)
    elapsed = time.perf_counter() - started

    done = _stored(job_id)
    assert done.state == "succeeded" and done.result is not None, done.error
    seconds = done.result["seconds"]
    assert set(seconds) == {"load", "prune", "store"}
    assert (seconds["load"], seconds["prune"]) == (1.5, 2.5)
    assert 0 < seconds["store"] < elapsed
    assert done.finished_at is not None and done.lease_owner == lifecycle.WORKER_ID
    assert done.progress == {"stage": "done", "percent": 100}
    with get_sessionmaker()() as session:
        (artifact,) = session.scalars(select(Artifact).where(Artifact.job_id == job_id))
    assert (artifact.format, artifact.filename, artifact.size) == (
        "safetensors",
        "model.safetensors",
        len(b"weights"),
    )


def test_a_job_the_reaper_returns_to_the_queue_is_sent_once_per_period(
    tenant: str, tmp_path: Path
) -> None:
    """Submitted (and first sent) an hour ago, its worker then killed: the reaper requeues it and
    marks it sent now, so neither this round's nor the next round's search for lost messages
    sends it again."""
    job_id = _job(tenant, tmp_path)
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    stale = timedelta(seconds=2 * get_settings().stale_after_seconds)
    with get_sessionmaker()() as session:
        assert jobs.claim(session, job_id, "killed:1")
        job = session.get_one(Job, job_id)
        job.created_at = job.sent_at = an_hour_ago
        job.heartbeat_at = datetime.now(UTC) - stale
        session.commit()

    first = lifecycle.reap(get_settings())
    second = lifecycle.reap(get_settings())

    assert first == ([job_id], [])
    assert second == ([], [])
    requeued = _stored(job_id)
    assert (requeued.state, requeued.lease_owner) == ("queued", None)


def test_a_duplicate_delivery_runs_no_step(
    tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim is atomic: a second delivery of a job that was taken finds it so, and returns."""
    job_id = _job(tenant, tmp_path)
    runs: list[str] = []
    monkeypatch.setattr(lifecycle, "execute", _steps(job_id, _succeed, runs))

    lifecycle.run_job(job_id)
    lifecycle.run_job(job_id)

    assert runs == [job_id]
    done = _stored(job_id)
    assert (done.state, done.attempt) == ("succeeded", 1)


def test_an_artifact_a_sweep_deleted_before_the_commit_is_stored_again(
    tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob nothing references yet may be swept between its upload and the commit that
    records it: once committed, the worker stores it again from its file."""
    job_id = _job(tenant, tmp_path)
    monkeypatch.setattr(lifecycle, "execute", _steps(job_id, _succeed))

    def stored_then_swept(path: Path, store: ArtifactStore | None = None) -> StoredBlob:
        blob = store_file(path, store)
        (store or get_store()).delete(blob.key)
        return blob

    monkeypatch.setattr(lifecycle, "store_file", stored_then_swept)

    lifecycle.run_job(job_id)

    assert _stored(job_id).state == "succeeded"
    with get_sessionmaker()() as session:
        (artifact,) = session.scalars(select(Artifact).where(Artifact.job_id == job_id))
    assert get_store().exists(artifact.blob_key)
