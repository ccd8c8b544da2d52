"""Job notifications, the API's side: the SSRF guard on `notify_url` (with a resolver that
lies), the tenant's signing secret, and the outbox rows a state change writes."""

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.core.settings import get_settings
from service.outbound import guard
from tests.service.factories import Caller, make_dataset, make_model
from tests.service.support import QueueRecorder, problem

PUBLIC = "93.184.216.34"


@pytest.fixture
def spec(db: Session, alice: Caller) -> dict[str, Any]:
    model = make_model(db, alice.tenant_id)
    dataset = make_dataset(db, alice.tenant_id)
    return {"model_id": model.id, "dataset_id": dataset.id, "target": {"macs": 0.5}}


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The resolver the guard asks: host → addresses, as a test wants it to answer."""
    answers: dict[str, list[str]] = {}

    def lying_resolver(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError(f"no such host {host}")
        return answers[host]

    monkeypatch.setattr(guard, "resolve", lying_resolver)
    return answers


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1"],
        ["10.1.2.3"],
        ["192.168.0.7"],
        ["169.254.169.254"],  # the cloud metadata service
        ["::1"],
        ["::ffff:127.0.0.1"],
        ["fe80::1%eth0"],
        ["0.0.0.0"],
        ["224.0.0.1"],
        [PUBLIC, "10.0.0.1"],  # one private answer among public ones is enough
    ],
)
def test_a_notify_url_reaching_a_non_public_address_is_refused(
    client: TestClient,
    alice: Caller,
    spec: dict[str, Any],
    dns: dict[str, list[str]],
    queued: QueueRecorder,
    addresses: list[str],
) -> None:
    dns["hooks.example.com"] = addresses

    response = client.post(
        "/v1/jobs",
        json=spec | {"notify_url": "https://hooks.example.com/apoptosis"},
        headers=alice.headers,
    )

    body = problem(response, 422, "notify_url_refused")
    assert "APOPTOSIS_WEBHOOK_ALLOW" in body["detail"]
    assert queued.jobs == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://[::1]/hook"])
def test_a_literal_private_address_is_refused(
    client: TestClient, alice: Caller, spec: dict[str, Any], url: str
) -> None:
    response = client.post("/v1/jobs", json=spec | {"notify_url": url}, headers=alice.headers)

    problem(response, 422, "notify_url_refused")


def test_an_unresolvable_host_is_refused(
    client: TestClient, alice: Caller, spec: dict[str, Any], dns: dict[str, list[str]]
) -> None:
    response = client.post(
        "/v1/jobs", json=spec | {"notify_url": "https://nowhere.example/"}, headers=alice.headers
    )

    assert "does not resolve" in problem(response, 422, "notify_url_refused")["detail"]


@pytest.mark.parametrize("allow", ['["127.0.0.5"]', '["127.0.0.0/8"]', '["receiver.internal"]'])
def test_the_operator_can_allow_a_private_receiver(
    client: TestClient,
    alice: Caller,
    spec: dict[str, Any],
    dns: dict[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    allow: str,
) -> None:
    monkeypatch.setenv("APOPTOSIS_WEBHOOK_ALLOW", allow)
    get_settings.cache_clear()
    dns["receiver.internal"] = ["127.0.0.5"]

    response = client.post(
        "/v1/jobs",
        json=spec | {"notify_url": "http://receiver.internal:8080/hook"},
        headers=alice.headers,
    )

    assert response.status_code == 202, response.text


def test_a_state_change_writes_its_notification_in_the_outbox(
    client: TestClient, alice: Caller, spec: dict[str, Any], dns: dict[str, list[str]]
) -> None:
    dns["hooks.example.com"] = [PUBLIC]
    url = "https://hooks.example.com/apoptosis"
    job = client.post("/v1/jobs", json=spec | {"notify_url": url}, headers=alice.headers).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice.headers)

    deliveries = client.get(f"/v1/jobs/{job['id']}/deliveries", headers=alice.headers).json()

    assert [d["event_type"] for d in deliveries] == ["job.queued", "job.cancelled"]
    assert {(d["url"], d["state"], d["attempts"]) for d in deliveries} == {(url, "pending", 0)}
    cancelled = deliveries[1]["payload"]
    assert cancelled["type"] == "job.cancelled"
    assert cancelled["data"]["id"] == job["id"] and cancelled["data"]["state"] == "cancelled"
    assert cancelled["data"]["url"] == f"/v1/jobs/{job['id']}"


def test_a_job_without_notify_url_writes_no_notification(
    client: TestClient, alice: Caller, spec: dict[str, Any]
) -> None:
    job = client.post("/v1/jobs", json=spec, headers=alice.headers).json()

    assert client.get(f"/v1/jobs/{job['id']}/deliveries", headers=alice.headers).json() == []


def test_each_tenant_has_its_own_secret_which_rotates(
    client: TestClient, alice: Caller, bob: Caller
) -> None:
    first = client.get("/v1/webhooks/secret", headers=alice.headers).json()["secret"]
    again = client.get("/v1/webhooks/secret", headers=alice.headers).json()["secret"]
    bobs = client.get("/v1/webhooks/secret", headers=bob.headers).json()["secret"]

    rotated = client.post("/v1/webhooks/secret/rotate", headers=alice.headers).json()["secret"]

    assert first.startswith("whsec_") and first == again
    assert bobs != first
    assert rotated != first
    assert client.get("/v1/webhooks/secret", headers=alice.headers).json()["secret"] == rotated


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com:65536/hook",
        "http://hooks.example.com:-1/hook",
        "http://[::1/hook",
        "http://[64:ff9b::zz]/hook",
        "http://127.0.0.1:8000\\@[64:ff9b::5db8:d822]/x",
    ],
)
@pytest.mark.parametrize("field", ["notify_url", "tracking_uri"])
def test_a_malformed_url_is_a_422_naming_the_field(
    client: TestClient, alice: Caller, spec: dict[str, Any], url: str, field: str
) -> None:
    named = (
        {"notify_url": url}
        if field == "notify_url"
        else {"mlflow": {"tracking_uri": url, "experiment": "e"}}
    )

    response = client.post("/v1/jobs", json=spec | named, headers=alice.headers)

    code = "notify_url_refused" if field == "notify_url" else "mlflow_refused"
    assert field in problem(response, 422, code)["detail"]
