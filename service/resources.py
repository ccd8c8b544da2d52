"""What models and datasets share: stored uploads owned by a tenant, listed newest first."""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.orm import Artifact, Dataset, Job, Model
from service.pagination import decode_cursor, encode_cursor
from service.problems import ProblemError, not_found
from service.storage import store_file
from service.store import StoredBlob
from service.uploads import Upload

Resource = TypeVar("Resource", Model, Dataset, Artifact)


MAX_NAME = 200  # the name column's width


@contextmanager
def discard_on_error(upload: Upload) -> Iterator[None]:
    """Checks of an upload: an empty file or a failed check leaves nothing behind."""
    try:
        if upload.size == 0:
            raise ProblemError(422, "empty_file", "the uploaded file is empty")
        yield
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise


def resource_name(upload: Upload) -> str:
    """The `name` field, else the file name (shortened); a `name` too long is refused."""
    name = upload.fields.get("name")
    if name is None:
        return upload.filename[:MAX_NAME]
    if not 0 < len(name) <= MAX_NAME:
        raise ProblemError(422, "invalid_name", f"name must have 1 to {MAX_NAME} characters")
    return name


def store_upload(upload: Upload) -> StoredBlob:
    """Move a spooled upload into the artifact store (content-addressed) and drop the spool."""
    try:
        return store_file(upload.path)
    finally:
        Path(upload.path).unlink(missing_ok=True)


def owned(session: Session, kind: type[Resource], tenant_id: str, resource_id: str) -> Resource:
    row = session.scalar(select(kind).where(kind.id == resource_id, kind.tenant_id == tenant_id))
    if row is None:
        raise not_found(kind.__tablename__, resource_id)
    return row


def page(
    session: Session, kind: type[Resource], tenant_id: str, limit: int, cursor: str | None
) -> tuple[Sequence[Resource], str | None]:
    query = select(kind).where(kind.tenant_id == tenant_id)
    after = decode_cursor(cursor)
    if after is not None:
        created, item_id = after
        query = query.where(
            (kind.created_at < created) | ((kind.created_at == created) & (kind.id < item_id))
        )
    rows = session.scalars(
        query.order_by(kind.created_at.desc(), kind.id.desc()).limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1].created_at, rows[-1].id) if more else None


def delete_unless_used(session: Session, row: Model | Dataset) -> None:
    """Delete an upload no job refers to; a 409 `<kind>_in_use` otherwise."""
    column = Job.model_id if isinstance(row, Model) else Job.dataset_id
    if session.scalar(select(Job.id).where(column == row.id).limit(1)) is not None:
        kind = row.__tablename__
        raise ProblemError(
            409, f"{kind}_in_use", f"jobs refer to this {kind}; it cannot be deleted"
        )
    session.delete(row)
    session.commit()
