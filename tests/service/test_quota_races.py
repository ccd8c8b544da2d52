"""The quotas hold when a tenant's requests arrive together (security issue 19, findings 7 and
10): each request has its own session on a real database — a file SQLite in WAL mode, and
Postgres — so a check that counts, then writes, without holding anything would let them all pass.

Not the savepoint fixture of the other service tests: its one connection serialises everything."""

import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.api.app import create_app
from service.cli.migrate import upgrade
from service.core import queue
from service.core.db import get_sessionmaker
from service.core.orm import Job
from service.core.settings import Settings
from service.core.store import ArtifactStore
from service.jobs.states import JobState
from tests.service.factories import Caller, make_dataset, make_model, make_tenant
from tests.service.models.test_upload import WEIGHTS
from tests.service.models.test_upload import upload as upload_model
from tests.service.support import Response, problem
from tests.service.test_quotas import set_limit

TOGETHER = 12
LIMIT = 3


def _postgres_answers() -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", 5432)) == 0


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh migrated database. It overrides the service tests' shared one, so the `settings`
    fixture points the app (and `get_sessionmaker`) at it."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'races.db'}"
        upgrade(url)
        yield url
        return
    if not os.environ.get("CI") and not _postgres_answers():
        pytest.skip("nothing answers on 127.0.0.1:5432 (CI runs Postgres)")
    from tests.integration.services import postgres_database

    with postgres_database() as url:
        upgrade(url)
        yield url


@pytest.fixture
def racing(
    settings: Settings, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    """The app on the fresh database, with its own sessions; the queue accepts and forgets."""
    monkeypatch.setattr(queue, "enqueue_job", lambda job_id, queue_name: None)
    monkeypatch.setattr(queue, "enqueue_validation", lambda model_id: None)
    with TestClient(create_app(store=store), base_url="http://127.0.0.1") as client:
        yield client


def together(request: Callable[[], Response]) -> list[Response]:
    """`request` sent from TOGETHER threads at once (a barrier releases them); the answers."""
    start = threading.Barrier(TOGETHER)

    def send() -> Response:
        start.wait()
        return request()

    with ThreadPoolExecutor(TOGETHER) as pool:
        futures = [pool.submit(send) for _ in range(TOGETHER)]
        return [future.result() for future in futures]


def _refused(responses: list[Response], code: str) -> list[Response]:
    refused = [response for response in responses if response.status_code == 429]
    for response in refused:
        problem(response, 429, code)
    return refused


def test_submits_that_arrive_together_pass_the_active_job_cap_only_up_to_it(
    racing: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_limit(monkeypatch, "MAX_ACTIVE_JOBS", LIMIT)
    with get_sessionmaker()() as session:
        alice = make_tenant(session, "alice")
        model = make_model(session, alice.tenant_id)
        dataset = make_dataset(session, alice.tenant_id)
    spec: dict[str, Any] = {"model_id": model.id, "dataset_id": dataset.id, "target": {"macs": 0.5}}

    responses = together(lambda: racing.post("/v1/jobs", json=spec, headers=alice.headers))

    accepted = [response for response in responses if response.status_code == 202]
    refused = _refused(responses, "too_many_jobs")
    assert (len(accepted), len(refused)) == (LIMIT, TOGETHER - LIMIT), [
        response.text for response in responses if response not in accepted + refused
    ]
    assert {response.headers["retry-after"] for response in refused} == {"30"}
    assert _active_jobs(alice) == LIMIT


def test_uploads_that_arrive_together_pass_the_rate_only_up_to_it(
    racing: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_limit(monkeypatch, "MAX_UPLOADS_PER_MINUTE", LIMIT)
    with get_sessionmaker()() as session:
        alice = make_tenant(session, "alice")

    responses = together(lambda: upload_model(racing, alice, WEIGHTS))

    accepted = [response for response in responses if response.status_code == 201]
    refused = _refused(responses, "upload_rate_exceeded")
    assert (len(accepted), len(refused)) == (LIMIT, TOGETHER - LIMIT), [
        response.text for response in responses if response not in accepted + refused
    ]


def _active_jobs(caller: Caller) -> int:
    with get_sessionmaker()() as session:
        query = select(func.count()).where(
            Job.tenant_id == caller.tenant_id, Job.state == JobState.QUEUED
        )
        return session.scalar(query) or 0
