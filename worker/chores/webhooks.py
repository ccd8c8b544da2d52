"""Sending job notifications from the outbox: signed per Standard Webhooks with the tenant's
secret, retried with exponential backoff, each attempt recorded.

Runs in every worker, off the request path, on an event loop of its own: several deliveries are
in flight at once (`webhook_concurrency`), at most `webhook_per_tenant` jobs' of one tenant, and
every request ends at a total deadline, so a receiver that answers slowly holds only its own
tenant's slots. One job's notifications go out in order, one at a time. A delivery is claimed
in the database before it is sent, so two workers never send the same attempt, and one that
dies mid-send leaves it due again. Requests go through the guarded outbound client: the address
checked is the address used, no redirect is followed, and a few KiB of the answer are read.
"""

import asyncio
import json
import logging
import threading
from collections import Counter, defaultdict
from datetime import timedelta

from standardwebhooks import Webhook

from service.core.db import get_sessionmaker
from service.core.orm import WebhookDelivery, utcnow
from service.core.settings import Settings
from service.outbound import client, guard
from service.webhooks import repository

log = logging.getLogger("apoptosis.worker")
FIRST_RETRY = timedelta(seconds=5)  # then 10 s, 20 s, … up to an hour
LAST_RETRY = timedelta(hours=1)
DUE_PER_TENANT = 20  # deliveries of one tenant a round looks at
DUE_PER_ROUND = 200
POLL_SECONDS = 2.0


def backoff(attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed attempt."""
    return min(FIRST_RETRY * 2 ** (attempts - 1), LAST_RETRY)


class Dispatcher:
    """The deliveries one worker has in flight, by tenant and by job."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tenant_jobs: Counter[str] = Counter()
        self.jobs: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.attempted = 0  # deliveries sent (or refused by the guard), whatever the answer

    async def start_due(self) -> int:
        """Start sending every due delivery there is room for; how many jobs' were started."""
        due = await asyncio.to_thread(_due, DUE_PER_ROUND)
        by_job: dict[str, list[str]] = defaultdict(list)
        tenant_of: dict[str, str] = {}
        for delivery_id, tenant_id, job_id in due:
            by_job[job_id].append(delivery_id)
            tenant_of[job_id] = tenant_id
        started = 0
        for job_id, delivery_ids in by_job.items():
            tenant_id = tenant_of[job_id]
            if len(self.tasks) >= self.settings.webhook_concurrency:
                break
            if (
                job_id in self.jobs
                or self.tenant_jobs[tenant_id] >= self.settings.webhook_per_tenant
            ):
                continue
            self.jobs.add(job_id)
            self.tenant_jobs[tenant_id] += 1
            task = asyncio.create_task(self._send_in_order(job_id, tenant_id, delivery_ids))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            started += 1
        return started

    async def drain(self) -> None:
        """Wait for every delivery in flight."""
        await asyncio.gather(*self.tasks)

    async def _send_in_order(self, job_id: str, tenant_id: str, delivery_ids: list[str]) -> None:
        try:
            for delivery_id in delivery_ids:
                claimed = await asyncio.to_thread(_claim, delivery_id, self.settings)
                if claimed is None:
                    continue  # another worker took it
                delivery, secret = claimed
                status, error = await _send(delivery, secret, self.settings)
                self.attempted += 1
                await asyncio.to_thread(_settle, delivery, status, error, self.settings)
        except Exception:  # the database said no: the delivery is due again after its claim
            log.exception("webhook delivery of job %s failed", job_id)
        finally:
            self.jobs.discard(job_id)
            self.tenant_jobs[tenant_id] -= 1


def deliver_due(settings: Settings) -> int:
    """One round, waited for: send every due delivery there is room for; how many were
    attempted."""

    async def one_round() -> int:
        dispatcher = Dispatcher(settings)
        await dispatcher.start_due()
        await dispatcher.drain()
        return dispatcher.attempted

    return asyncio.run(one_round())


def serve(settings: Settings, stop: threading.Event) -> None:
    """The worker's delivery loop: look for due deliveries every `POLL_SECONDS`, start those
    there is room for and go on looking while they are in flight, until `stop` is set."""

    async def loop() -> None:
        dispatcher = Dispatcher(settings)
        while not stop.is_set():
            try:
                await dispatcher.start_due()
            except Exception:  # the next round retries: deliveries stay in the outbox until sent
                log.exception("webhook round failed")
            await asyncio.sleep(POLL_SECONDS)

    asyncio.run(loop())


def _due(limit: int) -> list[tuple[str, str, str]]:
    with get_sessionmaker()() as session:
        return repository.due(session, utcnow(), limit, DUE_PER_TENANT)


def _claim(delivery_id: str, settings: Settings) -> tuple[WebhookDelivery, str | None] | None:
    now = utcnow()
    # If this process dies while sending, the delivery is due again after the deadline.
    retry_at = now + timedelta(seconds=settings.webhook_timeout_seconds) + FIRST_RETRY
    with get_sessionmaker()() as session:
        delivery = repository.claim(session, delivery_id, now, retry_at)
        secret = repository.webhook_secret(session, delivery.tenant_id) if delivery else None
        session.commit()
    return None if delivery is None else (delivery, secret)


async def _send(
    delivery: WebhookDelivery, secret: str | None, settings: Settings
) -> tuple[int | None, str | None]:
    """POST the signed payload; the response status, or the reason no answer came."""
    if secret is None:  # made at submit: only a job older than webhooks has none
        return None, "the tenant has no webhook secret (GET /v1/webhooks/secret makes one)"
    body = json.dumps(delivery.payload, separators=(",", ":"))
    sent_at = utcnow()
    headers = {
        "content-type": "application/json",
        "webhook-id": delivery.id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": Webhook(secret).sign(delivery.id, sent_at, body),
    }
    try:  # checked again by the client: DNS may answer otherwise than at submit
        reply = await client.send(
            "POST",
            delivery.url,
            settings.webhook_allow,
            deadline=settings.webhook_timeout_seconds,
            content=body.encode(),
            headers=headers,
        )
    except (guard.TargetRefused, client.OutboundError) as error:
        return None, str(error)
    return reply.status, None if reply.ok else reply.summary()


def _settle(
    delivery: WebhookDelivery, status: int | None, error: str | None, settings: Settings
) -> None:
    now = utcnow()
    if status is not None and 200 <= status < 300:
        values: dict[str, object] = {"state": "delivered", "delivered_at": now}
    elif delivery.attempts >= settings.webhook_max_attempts:
        values = {"state": "failed"}
        log.warning(
            "webhook %s to %s failed %d times", delivery.id, delivery.url, delivery.attempts
        )
    else:
        values = {"next_attempt_at": now + backoff(delivery.attempts)}
    with get_sessionmaker()() as session:
        repository.settle(session, delivery.id, last_status=status, last_error=error, **values)
        session.commit()
