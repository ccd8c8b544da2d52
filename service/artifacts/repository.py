"""All SQL for artifacts: the worker records them, clients list and download them."""

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.orm import Artifact


def add(session: Session, artifact: Artifact) -> None:
    session.add(artifact)


def of_job(session: Session, job_id: str) -> Sequence[Artifact]:
    return session.scalars(
        select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.created_at)
    ).all()
