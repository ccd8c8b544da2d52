"""All SQL for artifacts: the worker records them, clients list and download them."""

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.core.orm import Artifact, Job


def add(session: Session, artifact: Artifact) -> None:
    session.add(artifact)


def of_job(session: Session, job_id: str) -> Sequence[Artifact]:
    return session.scalars(
        select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.created_at)
    ).all()


def expire(session: Session, ended_before: datetime) -> int:
    """Forget the artifacts of jobs that ended before `ended_before`; how many went. Their blobs
    go with the next sweep, unless something else names them."""
    ended = select(Job.id).where(Job.finished_at < ended_before)
    result = session.execute(delete(Artifact).where(Artifact.job_id.in_(ended)))
    return int(result.rowcount)  # type: ignore[attr-defined]
