"""All SQL for webhooks: the outbox rows, the worker's claim and settlement, the tenants'
signing secrets."""

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.core.orm import Job, Tenant, WebhookDelivery


def job(session: Session, job_id: str) -> Job | None:
    """The job as it stands in this transaction (after an update the session has not seen)."""
    query = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    return session.scalar(query)


def add(session: Session, delivery: WebhookDelivery) -> None:
    session.add(delivery)


def of_job(session: Session, job_id: str) -> Sequence[WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
    return session.scalars(query.order_by(WebhookDelivery.created_at, WebhookDelivery.id)).all()


def due(session: Session, now: datetime, limit: int, per_tenant: int) -> list[tuple[str, str, str]]:
    """Pending deliveries whose next attempt is due, as (id, tenant id, job id), oldest first,
    at most `per_tenant` of each tenant: one tenant's backlog never fills a round."""
    rank = (
        func.row_number()
        .over(partition_by=WebhookDelivery.tenant_id, order_by=WebhookDelivery.next_attempt_at)
        .label("rank")
    )
    ranked = (
        select(
            WebhookDelivery.id,
            WebhookDelivery.tenant_id,
            WebhookDelivery.job_id,
            WebhookDelivery.next_attempt_at,
            rank,
        )
        .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now)
        .subquery()
    )
    query = (
        select(ranked.c.id, ranked.c.tenant_id, ranked.c.job_id)
        .where(ranked.c.rank <= per_tenant)
        .order_by(ranked.c.next_attempt_at, ranked.c.id)
        .limit(limit)
    )
    return [(row.id, row.tenant_id, row.job_id) for row in session.execute(query)]


def claim(
    session: Session, delivery_id: str, now: datetime, retry_at: datetime
) -> WebhookDelivery | None:
    """Take a due delivery for one attempt (attempts + 1): a worker that dies while sending
    leaves it due again at `retry_at`; a delivery another worker took is None."""
    taken = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.state == "pending",
            WebhookDelivery.next_attempt_at <= now,
        )
        .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=retry_at)
    )
    if not taken.rowcount:  # type: ignore[attr-defined]
        return None
    query = select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
    return session.scalar(query.execution_options(populate_existing=True))


def settle(session: Session, delivery_id: str, **values: Any) -> None:
    session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values)
    )


def webhook_secret(session: Session, tenant_id: str) -> str | None:
    return session.scalar(select(Tenant.webhook_secret).where(Tenant.id == tenant_id))


def set_webhook_secret(session: Session, tenant_id: str, secret: str, *, first: bool) -> None:
    """Set the tenant's secret; with `first`, only if it has none (two first reads agree)."""
    query = update(Tenant).where(Tenant.id == tenant_id)
    if first:
        query = query.where(Tenant.webhook_secret.is_(None))
    session.execute(query.values(webhook_secret=secret))
