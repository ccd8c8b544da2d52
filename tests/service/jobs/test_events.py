"""GET /v1/jobs/{id}/events: Server-Sent Events of a job's log, resumable, ending with the job."""

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.orm import JobEvent
from service.jobs import repository
from service.jobs import router as jobs_router
from service.jobs.states import JobState
from tests.service.factories import Caller, make_job
from tests.service.support import latin1_get

Frame = tuple[int, str, dict[str, Any]]
EventsAfter = Callable[..., Sequence[JobEvent]]


def frames(stream: str) -> list[Frame]:
    """Parse `id:`/`event:`/`data:` frames (comments, such as keep-alives, are skipped)."""
    parsed = []
    for block in stream.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":")
        )
        if fields:
            assert fields.keys() == {"id", "event", "data"}, block
            parsed.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return parsed


def log(db: Session, job_id: str, *entries: tuple[str, dict[str, Any]]) -> list[Frame]:
    """Append events to a job's log; return them as the stream should send them."""
    for kind, data in entries:
        repository.add_event(db, job_id, kind, data)
    db.flush()
    rows = db.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
    return [(row.id, row.kind, row.data) for row in rows]


HISTORY = (
    ("state", {"state": JobState.QUEUED}),
    ("state", {"state": JobState.RUNNING}),
    ("progress", {"stage": "pruning", "step": 1, "total": 2, "percent": 50.0}),
    ("progress", {"stage": "pruning", "step": 2, "total": 2, "percent": 100.0}),
    ("state", {"state": JobState.SUCCEEDED}),
)


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_router, "EVENT_POLL_SECONDS", 0.01)


def test_a_finished_jobs_events_stream_in_order_then_end(
    client: TestClient, db: Session, alice: Caller
) -> None:
    job = make_job(db, alice.tenant_id, JobState.SUCCEEDED)
    expected = log(db, job.id, *HISTORY)

    response = client.get(f"/v1/jobs/{job.id}/events", headers=alice.headers)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert frames(response.text) == expected


@pytest.mark.parametrize("resume_after", [0, 1, 4])
def test_last_event_id_resumes_after_that_event(
    client: TestClient, db: Session, alice: Caller, resume_after: int
) -> None:
    job = make_job(db, alice.tenant_id, JobState.SUCCEEDED)
    expected = log(db, job.id, *HISTORY)
    last_seen = expected[resume_after][0]

    response = client.get(
        f"/v1/jobs/{job.id}/events", headers=alice.headers | {"Last-Event-ID": str(last_seen)}
    )

    assert frames(response.text) == expected[resume_after + 1 :]


@pytest.mark.parametrize("last_event_id", ["abc", "9" * 5000])  # not a number; past any id
def test_a_malformed_last_event_id_replays_from_the_start(
    client: TestClient, db: Session, alice: Caller, last_event_id: str
) -> None:
    job = make_job(db, alice.tenant_id, JobState.SUCCEEDED)
    expected = log(db, job.id, *HISTORY)
    response = client.get(
        f"/v1/jobs/{job.id}/events", headers=alice.headers | {"Last-Event-ID": last_event_id}
    )
    assert response.status_code == 200
    assert frames(response.text) == expected


def test_a_last_event_id_of_digits_int_refuses_replays_from_the_start(
    app: FastAPI, db: Session, alice: Caller
) -> None:
    """A header is latin-1: '²' is a digit to str.isdigit, not a number to int()."""
    job = make_job(db, alice.tenant_id, JobState.SUCCEEDED)
    expected = log(db, job.id, *HISTORY)

    response = latin1_get(app, f"/v1/jobs/{job.id}/events", alice.headers | {"Last-Event-ID": "²"})

    assert response.status_code == 200
    assert frames(response.text) == expected


def test_a_long_log_streams_whole_across_polls(
    client: TestClient, db: Session, alice: Caller
) -> None:
    job = make_job(db, alice.tenant_id, JobState.SUCCEEDED)
    expected = log(db, job.id, *[("progress", {"step": step}) for step in range(1234)])
    response = client.get(f"/v1/jobs/{job.id}/events", headers=alice.headers)
    assert frames(response.text) == expected


def test_the_stream_follows_a_running_job_until_it_ends(
    client: TestClient,
    db: Session,
    monkeypatch: pytest.MonkeyPatch,
    fast_polls: None,
    alice: Caller,
) -> None:
    job = make_job(db, alice.tenant_id, JobState.RUNNING)
    log(db, job.id, *HISTORY[:2])
    original: EventsAfter = repository.events_after
    polls = 0

    def worker_finishes_before_the_third_poll(
        session: Session, job_id: str, after_id: int
    ) -> Sequence[JobEvent]:
        nonlocal polls
        polls += 1
        if polls == 3:  # the first poll sent the history, the second found nothing new
            repository.add_event(session, job_id, *HISTORY[2])
            assert repository.transition(session, job_id, JobState.SUCCEEDED)
            session.commit()
        return original(session, job_id, after_id)

    monkeypatch.setattr(repository, "events_after", worker_finishes_before_the_third_poll)

    response = client.get(f"/v1/jobs/{job.id}/events", headers=alice.headers)

    sent = [(kind, data) for _, kind, data in frames(response.text)]
    assert sent == [*HISTORY[:3], ("state", {"state": JobState.SUCCEEDED})]
    assert polls == 4


def test_the_final_event_is_sent_when_the_job_ends_between_the_two_reads(
    client: TestClient,
    db: Session,
    monkeypatch: pytest.MonkeyPatch,
    fast_polls: None,
    alice: Caller,
) -> None:
    job = make_job(db, alice.tenant_id, JobState.RUNNING)
    seen = log(db, job.id, *HISTORY[:2])
    original: EventsAfter = repository.events_after
    finished = False

    def worker_commits_right_after_the_read(
        session: Session, job_id: str, after_id: int
    ) -> Sequence[JobEvent]:
        nonlocal finished
        events = original(session, job_id, after_id)
        if not finished:
            assert repository.transition(session, job_id, JobState.SUCCEEDED)
            session.commit()
            finished = True
        return events

    monkeypatch.setattr(repository, "events_after", worker_commits_right_after_the_read)

    response = client.get(
        f"/v1/jobs/{job.id}/events", headers=alice.headers | {"Last-Event-ID": str(seen[-1][0])}
    )

    assert [(kind, data) for _, kind, data in frames(response.text)] == [
        ("state", {"state": JobState.SUCCEEDED})
    ]
