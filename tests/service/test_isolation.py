"""One tenant never reaches another's data: every operation of the OpenAPI document (so a new
endpoint is covered the day it is added) called with bob's key on alice's resources."""

import json
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.api.app import create_app
from service.core.store import ArtifactStore
from service.jobs import repository
from tests.service.factories import Caller, make_artifact, make_job
from tests.service.support import problem

# Operations on the collection itself: what bob sees there is checked by the listing test.
COLLECTIONS = {("post", "/v1/models"), ("post", "/v1/datasets"), ("post", "/v1/jobs")}


@dataclass(frozen=True)
class Alices:
    ids: dict[str, str]  # path parameter -> alice's resource

    @property
    def secrets(self) -> list[str]:
        return list(self.ids.values())


def _operations() -> list[tuple[str, str]]:
    document = create_app().openapi()
    return sorted(
        (method, path)
        for path, item in document["paths"].items()
        if path.startswith("/v1/")
        for method in item
        if (method, path) not in COLLECTIONS and "{" in path
    )


@pytest.fixture
def alices(db: Session, store: ArtifactStore, alice: Caller) -> Alices:
    job = make_job(db, alice.tenant_id, "succeeded")
    repository.add_event(db, job.id, "state", {"state": "succeeded"})
    artifact = make_artifact(db, store, job, b"alice's pruned model")
    db.commit()
    return Alices(
        {
            "model_id": job.model_id,
            "dataset_id": job.dataset_id or "",
            "job_id": job.id,
            "artifact_id": artifact.id,
        }
    )


@pytest.mark.parametrize(("method", "path"), _operations())
def test_another_tenants_resource_is_404_and_leaks_nothing(
    client: TestClient, alices: Alices, bob: Caller, method: str, path: str
) -> None:
    url = path.format(**alices.ids)

    response = client.request(method.upper(), url, headers=bob.headers)

    assert response.status_code == 404, (method, url, response.text)
    if method != "head":
        body = problem(response, 404, response.json()["code"])
        assert body["code"].endswith("_not_found")
    leaked = [s for s in alices.secrets if s in response.text and s not in url]
    assert leaked == []


def test_another_tenants_inputs_cannot_start_a_job(
    client: TestClient, alices: Alices, bob: Caller
) -> None:
    spec = {"model_id": alices.ids["model_id"], "dataset_id": alices.ids["dataset_id"]}
    problem(client.post("/v1/jobs", json=spec, headers=bob.headers), 404, "model_not_found")


@pytest.mark.parametrize("collection", ["/v1/models", "/v1/datasets", "/v1/jobs"])
def test_listings_hold_only_the_callers_resources(
    client: TestClient, alices: Alices, alice: Caller, bob: Caller, collection: str
) -> None:
    assert client.get(collection, headers=alice.headers).json()["items"]
    listed = client.get(collection, headers=bob.headers).json()
    assert listed["items"] == []
    assert not [s for s in alices.secrets if s in json.dumps(listed)]


def test_an_idempotency_key_replays_only_the_callers_job(
    client: TestClient, alices: Alices, alice: Caller, bob: Caller, db: Session
) -> None:
    spec: dict[str, Any] = {
        "model_id": alices.ids["model_id"],
        "dataset_id": alices.ids["dataset_id"],
    }
    headers = {"Idempotency-Key": "shared-key"}
    first = client.post("/v1/jobs", json=spec, headers=alice.headers | headers)
    assert first.status_code == 202, first.text

    replay = client.post("/v1/jobs", json=spec, headers=bob.headers | headers)

    problem(replay, 404, "model_not_found")
    assert first.json()["id"] not in replay.text
