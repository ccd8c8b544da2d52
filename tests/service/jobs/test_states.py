"""The job state machine (DESIGN §3) as the repository enforces it: guarded updates, leases."""

import itertools
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.orm import Job, JobEvent, utcnow
from service.jobs import repository
from service.jobs.states import STATES, TERMINAL, JobState
from tests.service.factories import WORKER, Caller, make_job

# Written out from DESIGN §3 rather than read from states.py, so that the table is checked.
ALLOWED = {
    (JobState.QUEUED, JobState.RUNNING),  # a worker claims it
    (JobState.QUEUED, JobState.CANCELLED),  # cancelled before it started
    (JobState.RUNNING, JobState.SUCCEEDED),
    (JobState.RUNNING, JobState.FAILED),
    (JobState.RUNNING, JobState.CANCELLING),  # cancellation is cooperative
    (JobState.RUNNING, JobState.QUEUED),  # the reaper returns a job whose worker went silent
    (JobState.CANCELLING, JobState.CANCELLED),
    (JobState.CANCELLING, JobState.SUCCEEDED),  # finishing first wins over a late cancel
    (JobState.CANCELLING, JobState.FAILED),
}


def state_of(db: Session, job_id: str) -> str | None:
    return db.scalar(select(Job.state).where(Job.id == job_id))


def state_events(db: Session, job_id: str) -> list[dict[str, object]]:
    query = select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.kind == "state")
    return list(db.scalars(query.order_by(JobEvent.id)))


def test_the_states_are_the_designed_ones() -> None:
    assert set(STATES) == {
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.CANCELLING,
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.CANCELLED,
    }
    assert {JobState.CANCELLED, JobState.FAILED, JobState.SUCCEEDED} == TERMINAL


@pytest.mark.parametrize(("current", "target"), list(itertools.product(STATES, STATES)))
def test_a_transition_happens_if_and_only_if_it_is_allowed(
    db: Session, alice: Caller, current: JobState, target: JobState
) -> None:
    job = make_job(db, alice.tenant_id, current)

    changed = repository.transition(db, job.id, target)
    db.flush()

    assert changed == ((current, target) in ALLOWED)
    assert state_of(db, job.id) == (target if changed else current)
    assert state_events(db, job.id) == ([{"state": target}] if changed else [])


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_terminal_states_never_change(db: Session, alice: Caller, terminal: str) -> None:
    job = make_job(db, alice.tenant_id, terminal)
    for target in STATES:
        assert not repository.transition(db, job.id, target)
        assert not repository.transition(db, job.id, target, owner=WORKER)
    assert not repository.claim(db, job.id, WORKER)
    assert repository.heartbeat(db, job.id, WORKER) is None
    assert state_of(db, job.id) == terminal
    assert state_events(db, job.id) == []


def test_only_the_lease_owner_moves_a_job_it_holds(db: Session, alice: Caller) -> None:
    job = make_job(db, alice.tenant_id, JobState.RUNNING)
    assert not repository.transition(db, job.id, JobState.SUCCEEDED, owner="someone-else")
    assert state_of(db, job.id) == JobState.RUNNING
    assert repository.transition(db, job.id, JobState.SUCCEEDED, owner=WORKER)
    assert state_of(db, job.id) == JobState.SUCCEEDED


def test_a_claim_takes_a_queued_job_once(db: Session, alice: Caller) -> None:
    job = make_job(db, alice.tenant_id, JobState.QUEUED)

    assert repository.claim(db, job.id, WORKER)
    # A redelivery, to this worker or another one, is a no-op.
    assert not repository.claim(db, job.id, WORKER)
    assert not repository.claim(db, job.id, "worker-2")

    db.expire_all()
    claimed = db.get(Job, job.id)
    assert claimed is not None
    assert (claimed.state, claimed.attempt, claimed.lease_owner) == (JobState.RUNNING, 1, WORKER)
    assert claimed.heartbeat_at is not None and claimed.started_at is not None
    assert state_events(db, job.id) == [{"state": JobState.RUNNING}]


def test_a_requeued_job_is_claimed_again_as_a_new_attempt(db: Session, alice: Caller) -> None:
    job = make_job(db, alice.tenant_id, JobState.QUEUED)
    assert repository.claim(db, job.id, WORKER)
    db.expire_all()
    first_start = db.get(Job, job.id).started_at
    assert repository.transition(db, job.id, JobState.QUEUED, lease_owner=None, heartbeat_at=None)
    assert repository.claim(db, job.id, "worker-2")
    db.expire_all()
    again = db.get(Job, job.id)
    assert again is not None
    assert (again.attempt, again.lease_owner) == (2, "worker-2")
    assert again.started_at == first_start  # the job started when its first attempt did


def test_a_heartbeat_from_the_wrong_owner_is_refused(db: Session, alice: Caller) -> None:
    job = make_job(db, alice.tenant_id, JobState.RUNNING)
    assert repository.heartbeat(db, job.id, "worker-2", {"stage": "pruning"}) is None
    db.expire_all()
    unchanged = db.get(Job, job.id)
    assert unchanged is not None
    assert unchanged.heartbeat_at is None and unchanged.progress == {}


def test_a_heartbeat_refreshes_the_lease_and_reports_cancellation(
    db: Session, alice: Caller
) -> None:
    job = make_job(db, alice.tenant_id, JobState.RUNNING)
    progress = {"stage": "pruning", "step": 2, "total": 10}

    assert repository.heartbeat(db, job.id, WORKER, progress) == JobState.RUNNING
    db.expire_all()
    beaten = db.get(Job, job.id)
    assert beaten is not None
    assert beaten.progress == progress and beaten.heartbeat_at is not None

    assert repository.transition(db, job.id, JobState.CANCELLING)
    assert repository.heartbeat(db, job.id, WORKER) == JobState.CANCELLING


def test_stale_finds_leased_jobs_whose_heartbeat_is_old(db: Session, alice: Caller) -> None:
    now = utcnow()
    old = {
        state: make_job(db, alice.tenant_id, state)
        for state in (JobState.RUNNING, JobState.CANCELLING)
    }
    fresh = make_job(db, alice.tenant_id, JobState.RUNNING)
    queued = make_job(db, alice.tenant_id, JobState.QUEUED)
    for job in old.values():
        job.heartbeat_at = now - timedelta(minutes=5)
    fresh.heartbeat_at = now
    queued.heartbeat_at = now - timedelta(minutes=5)  # never leased: not the reaper's business
    db.flush()

    stale = repository.stale(db, timedelta(minutes=1))

    assert sorted(job.id for job in stale) == sorted(job.id for job in old.values())
