"""Sending job notifications from the outbox: signed per Standard Webhooks with the tenant's
secret, retried with exponential backoff, each attempt recorded. Runs in every worker, off the
request path; a delivery is claimed in the database before it is sent, so two workers never
send the same attempt, and one that dies mid-send leaves it due again."""

import json
import logging
from datetime import timedelta

import httpx
from standardwebhooks import Webhook

from service.db import get_sessionmaker
from service.orm import WebhookDelivery, utcnow
from service.settings import Settings
from service.webhooks import repository, targets

log = logging.getLogger("apoptosis.worker")
FIRST_RETRY = timedelta(seconds=5)  # then 10 s, 20 s, … up to an hour
LAST_RETRY = timedelta(hours=1)
BATCH = 20


def backoff(attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed attempt."""
    return min(FIRST_RETRY * 2 ** (attempts - 1), LAST_RETRY)


def deliver_due(settings: Settings) -> int:
    """Send every delivery that is due; how many were attempted."""
    sessions = get_sessionmaker()
    now = utcnow()
    with sessions() as session:
        due = repository.due(session, now, BATCH)
    attempted = 0
    for delivery_id in due:
        with sessions() as session:
            # If this process dies while sending, the delivery is due again after the timeout.
            retry_at = now + timedelta(seconds=settings.webhook_timeout_seconds) + FIRST_RETRY
            delivery = repository.claim(session, delivery_id, now, retry_at)
            secret = repository.webhook_secret(session, delivery.tenant_id) if delivery else None
            session.commit()
        if delivery is None:
            continue  # another worker took it
        status, error = _send(delivery, secret, settings)
        _settle(delivery, status, error, settings)
        attempted += 1
    return attempted


def _send(
    delivery: WebhookDelivery, secret: str | None, settings: Settings
) -> tuple[int | None, str | None]:
    """POST the signed payload; the response status, or the reason no answer came."""
    if secret is None:  # made at submit: only a job older than webhooks has none
        return None, "the tenant has no webhook secret (GET /v1/webhooks/secret makes one)"
    try:  # checked again: DNS may answer otherwise than at submit
        addresses = targets.check(delivery.url, settings.webhook_allow)
    except targets.TargetRefused as error:
        return None, str(error)
    url = httpx.URL(delivery.url)
    body = json.dumps(delivery.payload, separators=(",", ":"))
    sent_at = utcnow()
    headers = {
        "host": url.netloc.decode(),
        "content-type": "application/json",
        "webhook-id": delivery.id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": Webhook(secret).sign(delivery.id, sent_at, body),
    }
    try:
        # To the address checked, with the name in Host and in TLS (SNI, certificate check).
        # No redirects: one could lead past the SSRF guard.
        with httpx.Client(timeout=settings.webhook_timeout_seconds) as client:
            request = client.build_request(
                "POST",
                url.copy_with(host=addresses[0].split("%")[0]),
                content=body,
                headers=headers,
                extensions={"sni_hostname": url.host},
            )
            response = client.send(request, follow_redirects=False)
    except httpx.HTTPError as error:
        return None, f"{type(error).__name__}: {error}"
    return response.status_code, None if response.is_success else response.text[:500]


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
