"""Retention: deleting models, datasets and jobs frees their blobs once nothing names them, the
sweep keeps what is named or fresh, and a blob swept while it is stored again comes back."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session, sessionmaker

from service.artifacts import repository as artifacts
from service.blobs import service as retention
from service.core.orm import Blob, Dataset, Job, Model
from service.core.settings import Settings
from service.core.store import ArtifactStore
from tests.service.datasets.test_datasets import TENSORS
from tests.service.datasets.test_datasets import upload as upload_dataset
from tests.service.factories import Caller, make_artifact, make_job
from tests.service.models.test_upload import WEIGHTS
from tests.service.models.test_upload import upload as upload_model
from tests.service.support import leftover_files

NO_GRACE = timedelta(0)


@pytest.fixture
def sessions(connection: Connection) -> sessionmaker[Session]:
    return sessionmaker(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )


def _blob_files(store: ArtifactStore, settings: Settings) -> list[Path]:
    return [p for p in leftover_files(settings) if "sha256" in p.parts]


def _ended_job_with_artifact(
    client: TestClient, db: Session, store: ArtifactStore, caller: Caller
) -> tuple[str, str, Job]:
    model_id = upload_model(client, caller, WEIGHTS).json()["id"]
    dataset_id = upload_dataset(client, caller, TENSORS).json()["id"]
    model, dataset = db.get_one(Model, model_id), db.get_one(Dataset, dataset_id)
    job = make_job(db, caller.tenant_id, "succeeded", model=model, dataset=dataset)
    make_artifact(db, store, job, b"pruned model bytes")
    return model_id, dataset_id, job


def test_deleting_everything_returns_the_store_to_empty(
    client: TestClient,
    db: Session,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    settings: Settings,
    alice: Caller,
) -> None:
    model_id, dataset_id, job = _ended_job_with_artifact(client, db, store, alice)
    assert len(_blob_files(store, settings)) == 3

    assert client.delete(f"/v1/jobs/{job.id}", headers=alice.headers).status_code == 204
    assert client.delete(f"/v1/models/{model_id}", headers=alice.headers).status_code == 204
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=alice.headers).status_code == 204
    swept = retention.sweep(sessions, store, NO_GRACE)

    assert (swept.blobs, swept.bytes) == (3, len(WEIGHTS) + len(TENSORS) + 18)
    assert leftover_files(settings) == []
    assert db.scalars(select(Blob)).all() == []
    assert client.get(f"/v1/jobs/{job.id}", headers=alice.headers).status_code == 404


def test_a_blob_stays_while_anything_names_it(
    client: TestClient,
    db: Session,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    settings: Settings,
    alice: Caller,
    bob: Caller,
) -> None:
    # The same bytes uploaded by two tenants are one blob with two references.
    first = upload_model(client, alice, WEIGHTS).json()["id"]
    second = upload_model(client, bob, WEIGHTS).json()["id"]
    assert client.delete(f"/v1/models/{first}", headers=alice.headers).status_code == 204

    assert retention.sweep(sessions, store, NO_GRACE).blobs == 0
    assert len(_blob_files(store, settings)) == 1

    assert client.delete(f"/v1/models/{second}", headers=bob.headers).status_code == 204
    assert retention.sweep(sessions, store, NO_GRACE).blobs == 1
    assert _blob_files(store, settings) == []


def test_a_blob_stored_within_the_grace_period_is_kept(
    client: TestClient,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    settings: Settings,
    alice: Caller,
) -> None:
    model_id = upload_model(client, alice, WEIGHTS).json()["id"]
    client.delete(f"/v1/models/{model_id}", headers=alice.headers)

    assert retention.sweep(sessions, store, timedelta(minutes=10)).blobs == 0
    assert len(_blob_files(store, settings)) == 1


@pytest.mark.parametrize("state", ["queued", "running", "cancelling"])
def test_a_job_that_has_not_ended_cannot_be_deleted(
    client: TestClient, db: Session, alice: Caller, state: str
) -> None:
    job = make_job(db, alice.tenant_id, state)

    response = client.delete(f"/v1/jobs/{job.id}", headers=alice.headers)

    assert response.status_code == 409
    assert response.json()["code"] == "job_not_ended"
    assert client.get(f"/v1/jobs/{job.id}", headers=alice.headers).json()["state"] == state


def test_another_tenants_job_is_not_found(
    client: TestClient, db: Session, alice: Caller, bob: Caller
) -> None:
    job = make_job(db, alice.tenant_id, "succeeded")

    assert client.delete(f"/v1/jobs/{job.id}", headers=bob.headers).status_code == 404
    assert client.get(f"/v1/jobs/{job.id}", headers=alice.headers).status_code == 200


def test_a_model_jobs_use_names_the_way_to_delete_it(
    client: TestClient, db: Session, alice: Caller
) -> None:
    job = make_job(db, alice.tenant_id, "failed")

    response = client.delete(f"/v1/models/{job.model_id}", headers=alice.headers)

    assert response.status_code == 409
    assert "DELETE /v1/jobs/" in response.json()["detail"]


def test_a_blob_swept_between_store_and_commit_is_stored_again(
    store: ArtifactStore, tmp_path: Path
) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(b"weights")
    blob = store.put_stream([b"weights"])
    store.delete(blob.key)  # what a sweep that won the race did

    retention.confirm_stored(store, blob, source)

    with store.open(blob.key) as stored:
        assert stored.read() == b"weights"


def test_expired_artifacts_go_and_their_blobs_with_them(
    db: Session,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    settings: Settings,
    alice: Caller,
) -> None:
    now = datetime.now(UTC)
    old = make_job(db, alice.tenant_id, "succeeded")
    recent = make_job(db, alice.tenant_id, "succeeded")
    old.finished_at, recent.finished_at = now - timedelta(days=10), now - timedelta(days=1)
    db.commit()
    make_artifact(db, store, old, b"old model")
    kept = make_artifact(db, store, recent, b"recent model")

    with sessions() as session:
        assert artifacts.expire(session, now - timedelta(days=7)) == 1
        session.commit()
    retention.sweep(sessions, store, NO_GRACE)

    assert {j.id for j in db.scalars(select(Job))} == {old.id, recent.id}  # the jobs stay
    assert [a.id for a in artifacts.of_job(db, old.id)] == []
    assert [a.id for a in artifacts.of_job(db, recent.id)] == [kept.id]
    assert store.exists(kept.blob_key)
    assert len(_blob_files(store, settings)) == 1
