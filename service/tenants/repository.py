"""All SQL for tenants, their API keys, and the rows they own: one read and one keyset page
(newest first on (created_at, id)) for models, datasets, jobs and artifacts alike; the lock a
quota check holds, and the uploads the rate admitted."""

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, func, select, union_all, update
from sqlalchemy import delete as delete_where
from sqlalchemy.orm import Session

from service.core.orm import ApiKey, Artifact, Dataset, Job, Model, Tenant, UploadAdmission, utcnow
from service.core.pagination import decode_cursor, encode_cursor

Owned = TypeVar("Owned", Model, Dataset, Job, Artifact)


def add_tenant(session: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def add_key(session: Session, tenant_id: str, key_hash: str, prefix: str) -> None:
    session.add(ApiKey(tenant_id=tenant_id, key_hash=key_hash, prefix=prefix))


def tenant_of_key(session: Session, key_hash: str) -> str | None:
    """The tenant whose unrevoked key has this hash."""
    return session.scalar(
        select(ApiKey.tenant_id).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    )


def key_record(session: Session, key_hash: str) -> ApiKey | None:
    """The key with this hash, revoked or not."""
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))


def keys(session: Session) -> Sequence[tuple[ApiKey, str]]:
    """Every key with its tenant's name, oldest first."""
    rows = session.execute(
        select(ApiKey, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .order_by(ApiKey.created_at, ApiKey.id)
    ).all()
    return [(key, name) for key, name in rows]


def keys_with_prefix(session: Session, prefix: str) -> Sequence[ApiKey]:
    return session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).all()


def revoke(session: Session, key: ApiKey) -> None:
    key.revoked_at = utcnow()


def owned(session: Session, kind: type[Owned], tenant_id: str, row_id: str) -> Owned | None:
    return session.scalar(select(kind).where(kind.id == row_id, kind.tenant_id == tenant_id))


def page(
    session: Session,
    kind: type[Owned],
    tenant_id: str,
    limit: int,
    cursor: str | None,
    *where: ColumnElement[Any],
) -> tuple[Sequence[Owned], str | None]:
    """Up to `limit` rows after `cursor`, newest first, and the cursor of the next page."""
    query = select(kind).where(kind.tenant_id == tenant_id, *where)
    after = decode_cursor(cursor)
    if after is not None:
        created, row_id = after
        query = query.where(
            (kind.created_at < created) | ((kind.created_at == created) & (kind.id < row_id))
        )
    rows = session.scalars(
        query.order_by(kind.created_at.desc(), kind.id.desc()).limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1].created_at, rows[-1].id) if more else None


def delete(session: Session, row: Model | Dataset) -> None:
    session.delete(row)


def stored_bytes(session: Session, tenant_id: str) -> int:
    """The bytes of the tenant's models, datasets and artifacts (a blob two rows name counts
    twice: each is the tenant's to delete)."""
    sizes = union_all(
        *(
            select(kind.size).where(kind.tenant_id == tenant_id)
            for kind in (Model, Dataset, Artifact)
        )
    ).subquery()
    return int(session.scalar(select(func.coalesce(func.sum(sizes.c.size), 0))) or 0)


def lock(session: Session, tenant_id: str) -> None:
    """Hold the tenant's row until the transaction ends, so that a quota's count-then-write runs
    for one request of the tenant at a time. A write that changes nothing rather than
    SELECT … FOR UPDATE: SQLite has no row locks, but a write as the first statement of a
    transaction takes its database's write lock, waiting its busy timeout for it (a transaction
    that read first may instead fail to upgrade, SQLITE_BUSY). On Postgres it is a row lock: other
    tenants go on."""
    session.execute(
        update(Tenant)
        .where(Tenant.id == tenant_id)
        .values(name=Tenant.name)
        .execution_options(synchronize_session=False)
    )


def uploads_since(session: Session, tenant_id: str, since: datetime) -> list[datetime]:
    """When the tenant's uploads admitted after `since` were admitted, oldest first."""
    return list(
        session.scalars(
            select(UploadAdmission.admitted_at)
            .where(UploadAdmission.tenant_id == tenant_id, UploadAdmission.admitted_at > since)
            .order_by(UploadAdmission.admitted_at)
        )
    )


def admit_upload(session: Session, tenant_id: str, at: datetime, forget_before: datetime) -> None:
    """Record an upload admitted `at`, and forget the tenant's admissions the rate no longer
    counts (those at or before `forget_before`)."""
    session.execute(
        delete_where(UploadAdmission).where(
            UploadAdmission.tenant_id == tenant_id, UploadAdmission.admitted_at <= forget_before
        )
    )
    session.add(UploadAdmission(tenant_id=tenant_id, admitted_at=at))
