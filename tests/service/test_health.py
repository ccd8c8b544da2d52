"""Liveness, readiness, Prometheus metrics and the OpenAPI document."""

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from service.core import queue
from service.core.orm import WorkerHeartbeat, utcnow
from service.core.store import ArtifactStore, StoreError
from service.workers import repository as workers
from tests.service.factories import Caller
from tests.service.support import problem, requests_counted


@pytest.fixture
def broker_up(monkeypatch: pytest.MonkeyPatch, db: Session) -> None:
    """The broker answers and one worker beat just now."""
    monkeypatch.setattr(queue, "broker_ready", lambda: True)
    workers.beat(db, "worker-1", "cpu")
    db.commit()


def test_healthz_is_200(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_checks_the_database_broker_and_store(client: TestClient, broker_up: None) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": True, "broker": True, "store": True, "workers": True},
    }


def test_readyz_is_503_while_the_broker_is_down(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, broker_up: None
) -> None:
    monkeypatch.setattr(queue, "broker_ready", lambda: False)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "not_ready",
        "checks": {"database": True, "broker": False, "store": True, "workers": True},
    }


def test_readyz_is_503_when_no_worker_beat_recently(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, db: Session
) -> None:
    monkeypatch.setattr(queue, "broker_ready", lambda: True)
    assert client.get("/readyz").json()["checks"]["workers"] is False  # none ever beat

    workers.beat(db, "worker-1", "cpu")
    db.execute(update(WorkerHeartbeat).values(beat_at=utcnow() - timedelta(hours=1)))
    db.commit()
    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"] == {
        "database": True,
        "broker": True,
        "store": True,
        "workers": False,  # one beat, an hour ago: it is gone
    }


def test_readyz_is_503_when_the_database_is_unreachable(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, broker_up: None
) -> None:
    from service.core import db
    from service.core.settings import get_settings

    monkeypatch.setenv("APOPTOSIS_DATABASE_URL", "sqlite:////nonexistent/folder/apoptosis.db")
    for cached in (get_settings, db.get_engine):
        cached.cache_clear()

    checks = _not_ready(client)

    assert checks.pop("database") is False
    assert all(checks.values())


def test_readyz_is_503_when_the_store_fails(
    client: TestClient, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch, broker_up: None
) -> None:
    def unreachable(key: str) -> bool:
        raise StoreError("the bucket does not answer")

    monkeypatch.setattr(store, "exists", unreachable)  # the store the app was given

    checks = _not_ready(client)

    assert checks.pop("store") is False
    assert all(checks.values())


def _not_ready(client: TestClient) -> dict[str, bool]:
    response = client.get("/readyz")
    assert response.status_code == 503
    checks: dict[str, bool] = response.json()["checks"]
    return checks


def test_metrics_count_requests_by_route_template(client: TestClient, alice: Caller) -> None:
    job_route = "/v1/jobs/{job_id}"
    before_ok = requests_counted(client, "GET", "/healthz", 200)
    before_404 = requests_counted(client, "GET", job_route, 404)

    client.get("/healthz")
    client.get("/healthz")
    client.get(f"/v1/jobs/{'1' * 32}", headers=alice.headers)

    assert requests_counted(client, "GET", "/healthz", 200) == before_ok + 2
    # The template, not the path: one series per route, whatever the ids.
    assert requests_counted(client, "GET", job_route, 404) == before_404 + 1
    text = client.get("/metrics").text
    assert "1" * 32 not in text
    assert "apoptosis_http_request_seconds_bucket" in text


def test_an_unknown_path_is_a_problem_and_counted_as_unmatched(client: TestClient) -> None:
    before = requests_counted(client, "GET", "unmatched", 404)
    problem(client.get("/v2/nothing"), 404, "not_found")
    assert requests_counted(client, "GET", "unmatched", 404) == before + 1


def test_a_wrong_method_is_a_405_problem(client: TestClient, alice: Caller) -> None:
    problem(client.put("/v1/jobs", headers=alice.headers), 405, "method_not_allowed")


def test_the_openapi_document_lists_the_v1_api(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    expected = {
        "/v1/models": {"get", "post"},
        "/v1/models/{model_id}": {"get", "delete"},
        "/v1/datasets": {"get", "post"},
        "/v1/datasets/{dataset_id}": {"get", "delete"},
        "/v1/jobs": {"get", "post"},
        "/v1/jobs/{job_id}": {"get", "delete"},
        "/v1/jobs/{job_id}/cancel": {"post"},
        "/v1/jobs/{job_id}/events": {"get"},
        "/v1/jobs/{job_id}/artifacts": {"get"},
        "/v1/jobs/{job_id}/report": {"get"},
        "/v1/artifacts/{artifact_id}/content": {"get", "head"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert set(paths[path]) == methods, path
    assert {"/healthz", "/readyz", "/metrics"} <= paths.keys()
