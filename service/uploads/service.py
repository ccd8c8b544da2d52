"""The upload use case models and datasets share: receive the body to disk, check its format,
name and content off the event loop, then move it into the store. A refused upload leaves
nothing behind; an upload no job refers to can be deleted."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.blobs import repository as blobs
from service.blobs import service as retention
from service.core.orm import Dataset, Model
from service.core.problems import ProblemError
from service.core.settings import get_settings
from service.core.store import ArtifactStore, store_file
from service.jobs import repository as jobs
from service.tenants import repository as tenants
from service.uploads import quota
from service.uploads.multipart import Upload, receive_upload

MAX_NAME = 200  # the name column's width
Stored = TypeVar("Stored", Model, Dataset)


@dataclass(frozen=True)
class Received:
    """An upload on disk that passed its checks, not yet stored."""

    upload: Upload
    name: str
    format: str


async def receive(
    request: Request,
    sessions: sessionmaker[Session],
    tenant_id: str,
    kind: str,
    formats: tuple[str, ...],
    check: Callable[[Upload, str], None],
) -> Received:
    """Spool the multipart body within the tenant's quotas, then check it; `check(upload,
    format)` runs in the thread pool and raises a `ProblemError` to refuse the upload."""
    settings = get_settings()
    declared = request.headers.get("content-length", "")
    declared_bytes = int(declared) if declared.isdecimal() else 0
    await run_in_threadpool(quota.admit, sessions, tenant_id, declared_bytes)
    upload = await receive_upload(request, settings.home / "tmp", settings.max_upload_bytes)
    with _discard_on_error(upload):
        if not declared_bytes:  # a chunked body: its size is known only now
            await run_in_threadpool(quota.check_bytes, sessions, tenant_id, upload.size)
        upload_format = upload.fields.get("format", "")
        if upload_format not in formats:
            raise ProblemError(
                422,
                "unsupported_format",
                f"{kind} format must be one of {formats}, got {upload_format!r}",
            )
        name = _name(upload)
        await run_in_threadpool(check, upload, upload_format)
    return Received(upload, name, upload_format)


def save(
    sessions: sessionmaker[Session],
    artifacts: ArtifactStore,
    tenant_id: str,
    received: Received,
    kind: type[Stored],
    add: Callable[[Session, Stored], None],
) -> Stored:
    """Move the spooled file into the store (content-addressed) and record it as a `kind` row
    (through its repository's `add`) with its blob; the spool goes once the row is committed."""
    spool = received.upload.path
    try:
        blob = store_file(spool, artifacts)
        row = kind(
            tenant_id=tenant_id,
            name=received.name,
            format=received.format,
            blob_key=blob.key,
            sha256=blob.sha256,
            size=blob.size,
        )
        with sessions() as session:
            add(session, row)
            blobs.record(session, blob)
            session.commit()
        retention.confirm_stored(artifacts, blob, spool)
    finally:
        spool.unlink(missing_ok=True)
    return row


def delete_unless_used(session: Session, row: Model | Dataset) -> None:
    """Delete an upload no job refers to; a 409 `<kind>_in_use` otherwise."""
    used = jobs.uses_model if isinstance(row, Model) else jobs.uses_dataset
    if used(session, row.id):
        kind = row.__tablename__
        raise ProblemError(
            409,
            f"{kind}_in_use",
            f"jobs refer to this {kind}; delete those jobs first (DELETE /v1/jobs/{{id}})",
        )
    tenants.delete(session, row)
    session.commit()


@contextmanager
def _discard_on_error(upload: Upload) -> Iterator[None]:
    """An empty file or a failed check leaves nothing behind."""
    try:
        if upload.size == 0:
            raise ProblemError(422, "empty_file", "the uploaded file is empty")
        yield
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise


def _name(upload: Upload) -> str:
    """The `name` field, else the file name (shortened); a `name` too long is refused."""
    name = upload.fields.get("name")
    if name is None:
        return upload.filename[:MAX_NAME]
    if not 0 < len(name) <= MAX_NAME:
        raise ProblemError(422, "invalid_name", f"name must have 1 to {MAX_NAME} characters")
    return name
