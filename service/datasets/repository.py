"""All SQL for datasets."""

from sqlalchemy.orm import Session

from service.core.orm import Dataset


def add(session: Session, dataset: Dataset) -> None:
    session.add(dataset)


def by_id(session: Session, dataset_id: str | None) -> Dataset | None:
    """Any tenant's dataset: for the worker, which has ids from a job, never from a user."""
    return session.get(Dataset, dataset_id) if dataset_id else None
