"""Job notifications, the worker's side: a real HTTP receiver on loopback verifies every
delivery with the tenant's secret (Standard Webhooks); failures are retried with backoff and
recorded; a host that resolves somewhere private by delivery time gets nothing."""

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import update
from standardwebhooks import Webhook

from service.core.db import get_sessionmaker
from service.core.orm import Dataset, Job, Model, WebhookDelivery, utcnow
from service.core.settings import get_settings
from service.jobs import repository as jobs
from service.jobs.states import JobState
from service.outbound import guard
from service.tenants.auth import create_tenant
from service.webhooks import repository, secret
from tests.worker.loopback import Flood, Trickle, answer, serving
from worker.chores import webhooks


class Receiver(ThreadingHTTPServer):
    """Answers each POST with the next status of `statuses` (200 once they run out) and keeps
    what it verified."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.statuses: list[int] = []
        self.requests: list[tuple[dict[str, str], bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.requests.append((dict(self.headers.items()), body))
        self.send_response(self.server.statuses.pop(0) if self.server.statuses else 200)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def loopback_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver listens on loopback, which the SSRF guard refuses unless allowed (set
    before `tenant` clears the settings)."""
    monkeypatch.setenv("APOPTOSIS_WEBHOOK_ALLOW", '["127.0.0.1"]')


def _job_that_ends(tenant: str, notify_url: str, end: JobState = JobState.CANCELLED) -> str:
    """A job naming `notify_url`, queued and then cancelled: two notifications in the outbox."""
    with get_sessionmaker()() as session:
        model = Model(tenant_id=tenant, name="m", format="hf", blob_key="k", sha256="s", size=1)
        dataset = Dataset(
            tenant_id=tenant, name="d", format="tensors", blob_key="k", sha256="s", size=1
        )
        session.add_all([model, dataset])
        session.flush()
        spec = {"model_id": model.id, "dataset_id": dataset.id, "notify_url": notify_url}
        job = Job(tenant_id=tenant, model_id=model.id, dataset_id=dataset.id, spec=spec)
        jobs.add(session, job)
        secret.ensure(session, tenant)
        assert jobs.transition(session, job.id, end, finished_at=utcnow())
        session.commit()
        return job.id


def _deliveries(job_id: str) -> list[WebhookDelivery]:
    with get_sessionmaker()() as session:
        return list(repository.of_job(session, job_id))


def _due_now(job_id: str) -> None:
    with get_sessionmaker()() as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()


def test_every_state_change_reaches_the_receiver_signed_with_the_tenants_secret(
    tenant: str, receiver: Receiver
) -> None:
    job_id = _job_that_ends(tenant, receiver.url)

    assert webhooks.deliver_due(get_settings()) == 2

    with get_sessionmaker()() as session:
        verifier = Webhook(secret.ensure(session, tenant))
    events = [verifier.verify(body, headers) for headers, body in receiver.requests]
    assert [e["type"] for e in events] == ["job.queued", "job.cancelled"]
    assert {e["data"]["id"] for e in events} == {job_id}
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert ids == [d.id for d in _deliveries(job_id)]
    assert [(d.state, d.attempts, d.last_status) for d in _deliveries(job_id)] == [
        ("delivered", 1, 200),
        ("delivered", 1, 200),
    ]
    assert webhooks.deliver_due(get_settings()) == 0  # nothing is sent twice


def test_a_signature_made_with_another_secret_does_not_verify(
    tenant: str, receiver: Receiver
) -> None:
    _job_that_ends(tenant, receiver.url)
    webhooks.deliver_due(get_settings())
    headers, body = receiver.requests[0]

    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + "A" * 32).verify(body, headers)


def _next_attempt(delivery: WebhookDelivery) -> datetime:
    return delivery.next_attempt_at.replace(tzinfo=UTC)  # SQLite hands back naive UTC


def test_a_failed_delivery_is_retried_with_backoff_until_it_succeeds(
    tenant: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's clock stands still and moves only when the test moves it (to the next
    attempt's time), so each retry is due exactly the backoff after the attempt that failed."""
    receiver.statuses = [503, 200, 503]  # the queued notification fails twice
    job_id = _job_that_ends(tenant, receiver.url, JobState.CANCELLED)
    started = utcnow()  # both notifications are due
    clock = [started]
    monkeypatch.setattr(webhooks, "utcnow", lambda: clock[0])

    webhooks.deliver_due(get_settings())
    first = _deliveries(job_id)[0]
    assert webhooks.deliver_due(get_settings()) == 0  # not due yet: nothing is sent
    clock[0] = _next_attempt(first)
    webhooks.deliver_due(get_settings())
    second = _deliveries(job_id)[0]
    clock[0] = _next_attempt(second)
    webhooks.deliver_due(get_settings())

    assert (first.state, first.attempts, first.last_status) == ("pending", 1, 503)
    assert _next_attempt(first) == started + timedelta(seconds=5)
    assert (second.state, second.attempts) == ("pending", 2)
    assert _next_attempt(second) == _next_attempt(first) + timedelta(seconds=10)  # doubled
    assert [(d.state, d.attempts) for d in _deliveries(job_id)] == [
        ("delivered", 3),
        ("delivered", 1),
    ]
    assert len(receiver.requests) == 4


def test_a_delivery_fails_for_good_after_the_last_attempt(
    tenant: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APOPTOSIS_WEBHOOK_MAX_ATTEMPTS", "2")
    get_settings.cache_clear()
    receiver.statuses = [500] * 10
    job_id = _job_that_ends(tenant, receiver.url)

    for _ in range(3):
        webhooks.deliver_due(get_settings())
        _due_now(job_id)

    assert [(d.state, d.attempts, d.last_status) for d in _deliveries(job_id)] == [
        ("failed", 2, 500),
        ("failed", 2, 500),
    ]


def test_a_host_resolving_to_loopback_at_delivery_time_gets_nothing(
    tenant: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the host was public at submit, and now points at the worker's loopback."""
    monkeypatch.setenv("APOPTOSIS_WEBHOOK_ALLOW", "[]")
    get_settings.cache_clear()
    port = receiver.server_address[1]
    monkeypatch.setattr(guard, "resolve", lambda host, port: ["127.0.0.1"])
    job_id = _job_that_ends(tenant, f"http://rebound.example:{port}/hook")

    webhooks.deliver_due(get_settings())

    assert receiver.requests == []
    (first, _) = _deliveries(job_id)
    assert first.last_status is None and "non-public address" in (first.last_error or "")


def test_the_sender_connects_to_the_address_it_checked(
    tenant: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The address checked is the address used: no second lookup a rebinding DNS could answer
    differently (this host name exists only in the test's resolver)."""
    port = receiver.server_address[1]
    monkeypatch.setattr(guard, "resolve", lambda host, port: ["127.0.0.1"])
    _job_that_ends(tenant, f"http://receiver.test:{port}/hook")

    webhooks.deliver_due(get_settings())

    assert [headers["host"] for headers, _ in receiver.requests] == [f"receiver.test:{port}"] * 2


def test_backoff_doubles_up_to_an_hour() -> None:
    waits = [webhooks.backoff(n).total_seconds() for n in (1, 2, 3, 12, 40)]
    assert waits == [5, 10, 20, 3600, 3600]


def test_a_receivers_huge_reply_is_not_read_and_a_few_kib_are_kept(tenant: str) -> None:
    flood = Flood(500)
    with serving(flood) as receiver:
        job_id = _job_that_ends(tenant, f"{receiver.url}/hook")

        webhooks.deliver_due(get_settings())
        assert flood.done.wait(30)

    first = _deliveries(job_id)[0]
    assert first.last_status == 500
    assert first.last_error is not None and len(first.last_error) <= 2100
    assert flood.written < 64 * 1024 * 1024  # the worker stopped reading long before the end


def test_a_trickling_receiver_is_cut_at_the_total_deadline(
    tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline covers the whole request, not each read."""
    monkeypatch.setenv("APOPTOSIS_WEBHOOK_TIMEOUT_SECONDS", "1")
    get_settings.cache_clear()
    trickle = Trickle(500)

    with serving(trickle) as slow:
        job_id = _job_that_ends(tenant, f"{slow.url}/hook")
        try:
            webhooks.deliver_due(get_settings())
        finally:
            trickle.released.set()

    for delivery in _deliveries(job_id):
        assert delivery.last_status is None
        assert "no complete answer within 1 s" in (delivery.last_error or "")


def test_a_slow_receiver_holds_only_its_own_tenants_deliveries(tenant: str) -> None:
    """Tenant A's receiver hangs until released; tenant B's notifications arrive meanwhile, and
    A never has more than its share of requests in flight."""
    per_tenant = get_settings().webhook_per_tenant
    release = threading.Event()
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def hang(request: BaseHTTPRequestHandler) -> None:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        release.wait(60)
        with lock:
            in_flight[0] -= 1
        answer(request, 200)

    b_arrived = threading.Event()

    def fast(request: BaseHTTPRequestHandler) -> None:
        answer(request, 200)
        if len(fast_server.requests) >= 2:
            b_arrived.set()

    with get_sessionmaker()() as session:
        other, _ = create_tenant(session, "b")
        session.commit()
    with serving(hang) as hanging, serving(fast) as fast_server:
        a_jobs = [_job_that_ends(tenant, f"{hanging.url}/hook") for _ in range(4)]
        b_job = _job_that_ends(other.id, f"{fast_server.url}/hook")  # due after all of A's
        round_ = threading.Thread(target=webhooks.deliver_due, args=(get_settings(),))
        round_.start()
        try:
            assert b_arrived.wait(30), "B's notifications waited behind A's slow receiver"
        finally:
            release.set()
            round_.join(60)

    assert [d.state for d in _deliveries(b_job)] == ["delivered", "delivered"]
    assert most[0] <= per_tenant
    assert sum(d.state == "delivered" for j in a_jobs for d in _deliveries(j)) == 2 * min(
        len(a_jobs), per_tenant
    )
