"""Per-tenant upload quotas: uploads per minute and bytes stored. Over either, a 429 problem
with `Retry-After`.

The rate counts the uploads it admitted (a row each), not the models and datasets that remain,
and counts and admits under the tenant's lock: uploads that arrive together take turns, so no more
pass than the limit, and deleting an upload gives back none of the minute. The byte quota is
checked as an upload is admitted (with its declared length) and, for a body of unknown length,
again with the bytes received; concurrent uploads can overshoot it by what they carry."""

import math
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from service.core.orm import utcnow
from service.core.problems import ProblemError
from service.core.settings import Settings, get_settings
from service.tenants import repository as tenants

RATE_WINDOW = timedelta(minutes=1)
FULL_RETRY_AFTER_SECONDS = 60  # storage frees when the tenant deletes: ask again in a minute


def admit(sessions: sessionmaker[Session], tenant_id: str, incoming_bytes: int) -> None:
    """Count one upload of the tenant's against the rate, or refuse it; refuse it too when
    `incoming_bytes` would pass the byte quota (then it is not counted)."""
    settings = get_settings()
    with sessions() as session:
        tenants.lock(session, tenant_id)  # the transaction's first statement: see `lock`
        now = utcnow()  # once the lock is ours: the time this upload is admitted
        window_start = now - RATE_WINDOW
        recent = tenants.uploads_since(session, tenant_id, window_start)
        if len(recent) >= settings.max_uploads_per_minute:
            raise _rate_exceeded(recent, now, settings)
        _check_bytes(tenants.stored_bytes(session, tenant_id), incoming_bytes, settings)
        tenants.admit_upload(session, tenant_id, now, forget_before=window_start)
        session.commit()


def check_bytes(sessions: sessionmaker[Session], tenant_id: str, incoming_bytes: int) -> None:
    """Refuse `incoming_bytes` more that would pass the tenant's byte quota."""
    with sessions() as session:
        stored = tenants.stored_bytes(session, tenant_id)
    _check_bytes(stored, incoming_bytes, get_settings())


def _rate_exceeded(recent: list[datetime], now: datetime, settings: Settings) -> ProblemError:
    limit = settings.max_uploads_per_minute
    oldest_leaves = _aware(recent[-limit]) + RATE_WINDOW
    wait = max(1, math.ceil((oldest_leaves - now).total_seconds()))
    return ProblemError(
        429,
        "upload_rate_exceeded",
        f"this tenant uploaded {len(recent)} files in the last minute, the limit is "
        f"{limit}; upload again in {wait} s",
        headers={"Retry-After": str(wait)},
        limit=limit,
    )


def _check_bytes(stored: int, incoming_bytes: int, settings: Settings) -> None:
    if stored + incoming_bytes > settings.max_tenant_bytes:
        raise ProblemError(
            429,
            "storage_quota_exceeded",
            f"this tenant stores {stored} bytes; with {incoming_bytes} more it would pass its "
            f"quota of {settings.max_tenant_bytes}. Delete models, datasets or jobs, then retry",
            headers={"Retry-After": str(FULL_RETRY_AFTER_SECONDS)},
            limit=settings.max_tenant_bytes,
            stored=stored,
        )


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored one is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
