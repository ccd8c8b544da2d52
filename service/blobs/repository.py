"""All SQL for blobs: recording a stored blob, finding unreferenced ones, claiming one to delete.

A blob's references are the model, dataset and artifact rows that name its key: counted from
those rows, so the count can never drift from them.
"""

from datetime import datetime

from sqlalchemy import ColumnElement, and_, delete, exists, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.core.orm import Artifact, Blob, Dataset, Model, utcnow
from service.core.store import StoredBlob

REFERRERS = (Model, Dataset, Artifact)


def record(session: Session, blob: StoredBlob) -> None:
    """Note that `blob` was (re)stored now, in the transaction that adds its reference. On a
    blob the sweep is deleting, this waits for the sweep's commit (a row lock): the caller then
    checks the blob is still in the store."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    now = utcnow()
    session.execute(
        dialect.insert(Blob)
        .values(key=blob.key, size=blob.size, stored_at=now)
        .on_conflict_do_update(index_elements=[Blob.key], set_={"stored_at": now})
    )


def _unreferenced() -> ColumnElement[bool]:
    return ~or_(*(exists().where(kind.blob_key == Blob.key) for kind in REFERRERS))


def unreferenced(session: Session, stored_before: datetime, limit: int = 500) -> list[str]:
    """Keys no row names that were last stored before `stored_before`."""
    query = select(Blob.key).where(Blob.stored_at < stored_before, _unreferenced()).limit(limit)
    return list(session.scalars(query))


def claim(session: Session, key: str, stored_before: datetime) -> int | None:
    """Delete the row of `key` if it is still unreferenced and old; its size, or None when a
    reference or a new store came first. The row stays locked until the caller commits, so a
    concurrent `record` of the same key waits until the blob is gone from the store."""
    size = session.scalar(select(Blob.size).where(Blob.key == key))
    condition = and_(Blob.key == key, Blob.stored_at < stored_before, _unreferenced())
    deleted = session.execute(delete(Blob).where(condition))
    return size if deleted.rowcount else None  # type: ignore[attr-defined]
