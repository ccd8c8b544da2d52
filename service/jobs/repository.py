"""All SQL for jobs and their events. Every state change is a guarded UPDATE … WHERE state IN."""

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.core.orm import Job, JobEvent, utcnow
from service.jobs.states import ALLOWED_FROM, LEASED, TERMINAL, JobState
from service.webhooks import outbox


def by_id(session: Session, job_id: str) -> Job | None:
    """Any tenant's job: for the worker, which has ids from the queue, never from a user."""
    return session.get(Job, job_id)


def state_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.state).where(Job.id == job_id))


def add(session: Session, job: Job) -> None:
    """A new job and the first event of its log, in the session's transaction."""
    session.add(job)
    session.flush()
    add_event(session, job.id, "state", {"state": job.state})


def uses_model(session: Session, model_id: str) -> bool:
    return session.scalar(select(Job.id).where(Job.model_id == model_id).limit(1)) is not None


def uses_dataset(session: Session, dataset_id: str) -> bool:
    return session.scalar(select(Job.id).where(Job.dataset_id == dataset_id).limit(1)) is not None


def delete_ended(session: Session, job_id: str) -> bool:
    """Delete the job if it has ended (its events and artifacts go with it, by cascade)."""
    result = session.execute(delete(Job).where(Job.id == job_id, Job.state.in_(TERMINAL)))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def active_count(session: Session, tenant_id: str) -> int:
    """The tenant's jobs that are queued, running or cancelling."""
    active = (JobState.QUEUED, *LEASED)
    query = select(func.count()).where(Job.tenant_id == tenant_id, Job.state.in_(active))
    return session.scalar(query) or 0


def by_idempotency_key(session: Session, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def transition(
    session: Session, job_id: str, target: JobState, *, owner: str | None = None, **values: Any
) -> bool:
    """Move `job_id` to `target` if its current state allows it; False if it did not.

    With `owner`, only the worker holding the lease may make the change.
    """
    query = update(Job).where(Job.id == job_id, Job.state.in_(ALLOWED_FROM[target]))
    if owner is not None:
        query = query.where(Job.lease_owner == owner)
    result = session.execute(query.values(state=target, **values))
    changed = bool(result.rowcount)  # type: ignore[attr-defined]
    if changed:
        add_event(session, job_id, "state", {"state": target})
    return changed


def claim(session: Session, job_id: str, worker: str) -> bool:
    """Atomically take a queued job (queued → running, attempt + 1): a redelivery is a no-op."""
    now = utcnow()
    return transition(
        session,
        job_id,
        JobState.RUNNING,
        attempt=Job.attempt + 1,
        lease_owner=worker,
        heartbeat_at=now,
        started_at=func.coalesce(Job.started_at, now),
    )


def heartbeat(
    session: Session, job_id: str, worker: str, progress: dict[str, Any] | None = None
) -> str | None:
    """Refresh the lease (and progress); returns the job's state, None if the lease is lost."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.lease_owner == worker,
            Job.state.in_(LEASED),
        )
        .values(**values)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return None
    return session.scalar(select(Job.state).where(Job.id == job_id))


def stale(session: Session, older_than: timedelta) -> Sequence[Job]:
    cutoff = utcnow() - older_than
    return session.scalars(
        select(Job).where(Job.state.in_(LEASED), Job.heartbeat_at < cutoff)
    ).all()


def unsent_since(session: Session, cutoff: datetime) -> list[str]:
    """Queued jobs whose message was last sent before `cutoff` (a broker that restarted empty
    lost it), marked as sent now: the caller sends them again. A duplicate is harmless (the
    claim is atomic); a job waiting its turn is re-sent at most once per period."""
    sent = func.coalesce(Job.sent_at, Job.created_at)
    ids = list(session.scalars(select(Job.id).where(Job.state == JobState.QUEUED, sent < cutoff)))
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(sent_at=utcnow()))
    return ids


def add_event(session: Session, job_id: str, kind: str, data: dict[str, Any]) -> None:
    """Append to the job's log; a state change also queues its notification (the outbox)."""
    session.add(JobEvent(job_id=job_id, kind=kind, data=data))
    if kind == "state":
        outbox.add_for_state(session, job_id, data["state"])


def events_after(
    session: Session, job_id: str, after_id: int, limit: int = 500
) -> Sequence[JobEvent]:
    return session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id)
        .limit(limit)
    ).all()
