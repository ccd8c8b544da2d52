"""Per-tenant upload quotas: bytes stored and uploads per minute. Over either, a 429 problem
with `Retry-After`. Checked before the body is read (with its declared length) and again with
the bytes received; concurrent uploads can overshoot the byte quota by what they carry."""

import math
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from service.orm import utcnow
from service.problems import ProblemError
from service.settings import get_settings
from service.tenants import repository as tenants

RATE_WINDOW = timedelta(minutes=1)
FULL_RETRY_AFTER_SECONDS = 60  # storage frees when the tenant deletes: ask again in a minute


def check(sessions: sessionmaker[Session], tenant_id: str, incoming_bytes: int) -> None:
    settings = get_settings()
    now = utcnow()
    with sessions() as session:
        recent = tenants.uploads_since(session, tenant_id, now - RATE_WINDOW)
        stored = tenants.stored_bytes(session, tenant_id)
    if len(recent) >= settings.max_uploads_per_minute:
        oldest_leaves = _aware(recent[-settings.max_uploads_per_minute]) + RATE_WINDOW
        wait = max(1, math.ceil((oldest_leaves - now).total_seconds()))
        raise ProblemError(
            429,
            "upload_rate_exceeded",
            f"this tenant uploaded {len(recent)} files in the last minute, the limit is "
            f"{settings.max_uploads_per_minute}; upload again in {wait} s",
            headers={"Retry-After": str(wait)},
            limit=settings.max_uploads_per_minute,
        )
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
