"""API keys: who may call, what they may see, and what the database keeps of a key."""

from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, select, text, update
from sqlalchemy.orm import Session

from service.core.orm import ApiKey, Dataset, Job, Model
from service.core.store import ArtifactStore
from service.tenants.auth import hash_key
from tests.service.factories import SPEC, Caller, make_artifact, make_dataset, make_job, make_model
from tests.service.support import problem


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "unauthenticated"),
        ({"Authorization": ""}, "unauthenticated"),
        ({"Authorization": "Bearer"}, "unauthenticated"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "unauthenticated"),
        ({"Authorization": "Bearer apo_not-a-key"}, "invalid_api_key"),
    ],
)
def test_requests_without_a_valid_key_are_401(
    client: TestClient, alice: Caller, headers: dict[str, str], code: str
) -> None:
    for path in ("/v1/models", "/v1/datasets", "/v1/jobs"):
        problem(client.get(path, headers=headers), 401, code)


def test_a_valid_key_is_accepted_and_a_revoked_one_is_not(
    client: TestClient, db: Session, alice: Caller
) -> None:
    assert client.get("/v1/models", headers=alice.headers).status_code == 200
    db.execute(
        update(ApiKey)
        .where(ApiKey.tenant_id == alice.tenant_id)
        .values(revoked_at=datetime.now(UTC))
    )
    problem(client.get("/v1/models", headers=alice.headers), 401, "invalid_api_key")


def test_keys_are_stored_only_as_their_sha256(
    db: Session, connection: Connection, alice: Caller
) -> None:
    rows = connection.execute(text("SELECT * FROM api_key")).all()
    assert rows, "the fixture stored a key"
    for row in rows:
        assert all(alice.key not in str(value) for value in row)
    stored = db.scalars(select(ApiKey.key_hash).where(ApiKey.tenant_id == alice.tenant_id)).all()
    assert stored == [hash_key(alice.key)]


def test_another_tenants_resources_are_404_like_missing_ones(
    client: TestClient, db: Session, store: ArtifactStore, alice: Caller, bob: Caller
) -> None:
    job = make_job(db, alice.tenant_id, "succeeded")
    artifact = make_artifact(db, store, job, b"pruned weights")
    paths = {
        "model": f"/v1/models/{job.model_id}",
        "dataset": f"/v1/datasets/{job.dataset_id}",
        "job": f"/v1/jobs/{job.id}",
        "artifact": f"/v1/artifacts/{artifact.id}/content",
    }
    for kind, path in paths.items():
        assert client.get(path, headers=alice.headers).status_code == 200
        theirs = problem(client.get(path, headers=bob.headers), 404, f"{kind}_not_found")
        missing_path = path.replace(path.split("/")[3], "0" * 32)
        missing = problem(client.get(missing_path, headers=bob.headers), 404, f"{kind}_not_found")
        # Nothing but the id asked for tells the two apart: no 403, no owner, no state.
        assert theirs.keys() == missing.keys()
        assert theirs["detail"].replace(path.split("/")[3], "0" * 32) == missing["detail"]
    for path in (
        f"/v1/jobs/{job.id}/artifacts",
        f"/v1/jobs/{job.id}/report",
        f"/v1/jobs/{job.id}/events",
    ):
        problem(client.get(path, headers=bob.headers), 404, "job_not_found")
    problem(client.post(f"/v1/jobs/{job.id}/cancel", headers=bob.headers), 404, "job_not_found")


def test_another_tenants_resources_cannot_be_deleted_or_used(
    client: TestClient, db: Session, alice: Caller, bob: Caller
) -> None:
    model = make_model(db, alice.tenant_id)
    dataset = make_dataset(db, alice.tenant_id)
    problem(client.delete(f"/v1/models/{model.id}", headers=bob.headers), 404, "model_not_found")
    problem(
        client.delete(f"/v1/datasets/{dataset.id}", headers=bob.headers), 404, "dataset_not_found"
    )
    assert db.get(Model, model.id) is not None
    assert db.get(Dataset, dataset.id) is not None

    bobs_dataset = make_dataset(db, bob.tenant_id)
    spec = {**SPEC, "model_id": model.id, "dataset_id": bobs_dataset.id}
    problem(client.post("/v1/jobs", json=spec, headers=bob.headers), 404, "model_not_found")
    assert db.scalar(select(Job.id).where(Job.tenant_id == bob.tenant_id)) is None


def test_listings_show_only_the_callers_resources(
    client: TestClient, db: Session, alice: Caller, bob: Caller
) -> None:
    alices = make_job(db, alice.tenant_id)
    bobs = make_job(db, bob.tenant_id)
    for caller, job in ((alice, alices), (bob, bobs)):
        for path, expected in (
            ("/v1/models", job.model_id),
            ("/v1/datasets", job.dataset_id),
            ("/v1/jobs", job.id),
        ):
            items = client.get(path, headers=caller.headers).json()["items"]
            assert [item["id"] for item in items] == [expected]
