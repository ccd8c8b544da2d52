"""GET /v1/jobs (paginated, filtered), GET /v1/jobs/{id}, its report, and cancellation."""

from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.orm import Job, JobEvent
from service.jobs.states import STATES, TERMINAL, JobState
from tests.service.factories import Caller, make_job, make_model
from tests.service.support import Response, newest_first, problem, walk

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


def test_a_job_reads_back_with_its_progress_result_and_error(
    client: TestClient, db: Session, alice: Caller
) -> None:
    job = make_job(db, alice.tenant_id, "failed")
    job.progress = {"stage": "pruning", "step": 3, "total": 10, "percent": 30.0}
    job.error = {"code": "empty_dataset", "message": "the dataset has no rows"}
    db.flush()

    body = client.get(f"/v1/jobs/{job.id}", headers=alice.headers).json()

    assert (body["id"], body["state"], body["model_id"]) == (job.id, "failed", job.model_id)
    assert body["progress"] == job.progress
    assert body["error"] == job.error
    assert body["spec"] == job.spec
    assert "tenant_id" not in body and "lease_owner" not in body

    report = client.get(f"/v1/jobs/{job.id}/report", headers=alice.headers).json()
    assert report == {
        "job_id": job.id,
        "state": "failed",
        "spec": job.spec,
        "result": None,
        "error": job.error,
    }


def test_an_unknown_job_is_404(client: TestClient, alice: Caller) -> None:
    problem(client.get(f"/v1/jobs/{'a' * 32}", headers=alice.headers), 404, "job_not_found")


@pytest.mark.parametrize("limit", [1, 4, 50])
def test_pages_walk_every_job_once_newest_first(
    client: TestClient, db: Session, alice: Caller, bob: Caller, limit: int
) -> None:
    model = make_model(db, alice.tenant_id)
    jobs = [
        make_job(
            db,
            alice.tenant_id,
            STATES[i % len(STATES)],
            model=model,
            created_at=EPOCH + timedelta(minutes=i // 3),
        )
        for i in range(9)
    ]
    make_job(db, bob.tenant_id)
    db.expire_all()

    pages = walk(client, "/v1/jobs", alice, limit)

    assert [id_ for page in pages for id_ in page] == newest_first(jobs)
    assert all(len(page) == limit for page in pages[:-1])


@pytest.mark.parametrize("state", STATES)
def test_the_state_filter_pages_through_that_state_only(
    client: TestClient, db: Session, alice: Caller, state: str
) -> None:
    model = make_model(db, alice.tenant_id)
    jobs = [
        make_job(db, alice.tenant_id, s, model=model, created_at=EPOCH + timedelta(seconds=i))
        for i, s in enumerate(STATES * 3)
    ]
    db.expire_all()

    pages = walk(client, "/v1/jobs", alice, 2, state=state)

    assert [id_ for page in pages for id_ in page] == newest_first(
        [job for job in jobs if job.state == state]
    )


@pytest.mark.parametrize("state", ["done", "JobState.QUEUED", ""])
def test_an_unknown_state_filter_is_400(client: TestClient, alice: Caller, state: str) -> None:
    response = client.get("/v1/jobs", params={"state": state}, headers=alice.headers)
    problem(response, 400, "invalid_state_filter")


def test_a_malformed_job_cursor_is_400(client: TestClient, alice: Caller) -> None:
    response = client.get("/v1/jobs", params={"cursor": "%%%"}, headers=alice.headers)
    problem(response, 400, "invalid_cursor")


def cancel(client: TestClient, caller: Caller, job: Job) -> Response:
    return client.post(f"/v1/jobs/{job.id}/cancel", headers=caller.headers)


def events_of(db: Session, job: Job) -> list[dict[str, object]]:
    query = select(JobEvent.data).where(JobEvent.job_id == job.id).order_by(JobEvent.id)
    return list(db.scalars(query))


def test_cancelling_a_queued_job_ends_it(client: TestClient, db: Session, alice: Caller) -> None:
    job = make_job(db, alice.tenant_id, JobState.QUEUED)
    response = cancel(client, alice, job)
    assert response.status_code == 202, response.text
    assert response.json()["state"] == JobState.CANCELLED
    db.expire_all()
    ended = db.get(Job, job.id)
    assert ended is not None
    assert ended.state == JobState.CANCELLED and ended.finished_at is not None
    assert events_of(db, job) == [{"state": JobState.CANCELLED}]


def test_cancelling_a_running_job_asks_its_worker_to_stop(
    client: TestClient, db: Session, alice: Caller
) -> None:
    job = make_job(db, alice.tenant_id, JobState.RUNNING)
    response = cancel(client, alice, job)
    assert response.status_code == 202
    assert response.json()["state"] == JobState.CANCELLING
    db.expire_all()
    asked = db.get(Job, job.id)
    assert asked is not None
    assert asked.state == JobState.CANCELLING and asked.finished_at is None
    assert events_of(db, job) == [{"state": JobState.CANCELLING}]


def test_cancelling_twice_is_accepted_and_changes_nothing(
    client: TestClient, db: Session, alice: Caller
) -> None:
    job = make_job(db, alice.tenant_id, JobState.CANCELLING)
    response = cancel(client, alice, job)
    assert response.status_code == 202
    assert response.json()["state"] == JobState.CANCELLING
    assert state(db, job) == JobState.CANCELLING
    assert events_of(db, job) == []


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_a_finished_job_cannot_be_cancelled(
    client: TestClient, db: Session, alice: Caller, terminal: str
) -> None:
    job = make_job(db, alice.tenant_id, terminal)
    body = problem(cancel(client, alice, job), 409, "invalid_state_transition")
    assert body["state"] == terminal
    assert state(db, job) == terminal
    assert events_of(db, job) == []


def state(db: Session, job: Job) -> str | None:
    return db.scalar(select(Job.state).where(Job.id == job.id))
