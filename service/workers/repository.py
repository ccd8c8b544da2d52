"""All SQL for worker heartbeats: each worker process beats while it runs; /readyz counts the
ones that beat recently."""

from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.core.orm import WorkerHeartbeat, utcnow


def beat(session: Session, name: str, queues: str) -> None:
    """Record that worker `name` is alive now (its row is made on the first beat)."""
    now = utcnow()
    changed = session.execute(
        update(WorkerHeartbeat).where(WorkerHeartbeat.name == name).values(beat_at=now)
    )
    if not changed.rowcount:  # type: ignore[attr-defined]
        session.add(WorkerHeartbeat(name=name, queues=queues, beat_at=now))


def forget(session: Session, name: str) -> None:
    """A worker that stops cleanly says so at once."""
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name == name))


def forget_silent_since(session: Session, cutoff: datetime) -> int:
    """Drop the rows of workers silent since `cutoff` (killed ones never say goodbye)."""
    result = session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.beat_at < cutoff))
    return int(result.rowcount)  # type: ignore[attr-defined]


def alive_since(session: Session, cutoff: datetime) -> int:
    """How many workers beat after `cutoff`."""
    query = select(func.count()).where(WorkerHeartbeat.beat_at >= cutoff)
    return session.scalar(query) or 0
