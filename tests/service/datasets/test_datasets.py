"""/v1/datasets: uploads like models' (no validation step), listing, reading, deleting."""

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.core.orm import Dataset
from service.core.settings import Settings
from service.core.store import ArtifactStore
from tests.service.factories import Caller, make_dataset, make_job, safetensors_bytes
from tests.service.support import (
    MAX_UPLOAD_BYTES,
    QueueRecorder,
    Response,
    leftover_files,
    newest_first,
    problem,
    walk,
)

TENSORS = safetensors_bytes(bytes(range(256)) * 100)


def upload(client: TestClient, caller: Caller, content: bytes, fmt: str = "tensors") -> Response:
    return client.post(
        "/v1/datasets",
        headers=caller.headers,
        data={"format": fmt, "name": "calibration"},
        files={"file": ("calibration.npz", content, "application/octet-stream")},
    )


def test_a_dataset_upload_is_stored_and_hashed(
    client: TestClient,
    db: Session,
    settings: Settings,
    store: ArtifactStore,
    queued: QueueRecorder,
    alice: Caller,
) -> None:
    response = upload(client, alice, TENSORS)

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["format"]) == ("calibration", "tensors")
    assert (body["sha256"], body["size"]) == (hashlib.sha256(TENSORS).hexdigest(), len(TENSORS))
    dataset = db.get(Dataset, body["id"])
    assert dataset is not None
    assert dataset.tenant_id == alice.tenant_id
    with store.open(dataset.blob_key) as blob:
        assert blob.read() == TENSORS
    assert queued.validations == [] and queued.jobs == []
    assert not list((settings.home / "tmp").iterdir())


@pytest.mark.parametrize(
    ("fmt", "content", "status", "code"),
    [
        ("tensors", b"\0" * (MAX_UPLOAD_BYTES + 1), 413, "upload_too_large"),
        ("tensors", b"\0" * (3 * MAX_UPLOAD_BYTES), 413, "upload_too_large"),
        ("jsonl", TENSORS, 422, "invalid_dataset"),
        ("jsonl", b"[" * 100_000 + b"\n", 422, "invalid_dataset"),  # nests past recursion
        ("onnx", TENSORS, 422, "unsupported_format"),
        ("", TENSORS, 422, "unsupported_format"),
        ("tensors", b"", 422, "empty_file"),
    ],
)
def test_refused_dataset_uploads_leave_nothing(
    client: TestClient,
    db: Session,
    settings: Settings,
    alice: Caller,
    fmt: str,
    content: bytes,
    status: int,
    code: str,
) -> None:
    problem(upload(client, alice, content, fmt), status, code)
    assert leftover_files(settings) == []
    assert db.scalar(select(func.count()).select_from(Dataset)) == 0


def test_a_dataset_body_that_is_not_multipart_is_415(client: TestClient, alice: Caller) -> None:
    response = client.post("/v1/datasets", headers=alice.headers, json={"format": "tensors"})
    problem(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_pages_walk_every_dataset_once_newest_first(
    client: TestClient, db: Session, alice: Caller, bob: Caller, limit: int
) -> None:
    epoch = datetime(2025, 1, 1, tzinfo=UTC)
    datasets = [
        make_dataset(db, alice.tenant_id, name=f"d{i}", created_at=epoch + timedelta(hours=i % 3))
        for i in range(5)
    ]
    make_dataset(db, bob.tenant_id)
    db.expire_all()

    pages = walk(client, "/v1/datasets", alice, limit)

    assert [id_ for page in pages for id_ in page] == newest_first(datasets)
    assert all(len(page) == limit for page in pages[:-1])


def test_reading_and_deleting_a_dataset(client: TestClient, db: Session, alice: Caller) -> None:
    dataset = make_dataset(db, alice.tenant_id)
    body = client.get(f"/v1/datasets/{dataset.id}", headers=alice.headers).json()
    assert (body["id"], body["sha256"], body["size"]) == (dataset.id, dataset.sha256, dataset.size)

    assert client.delete(f"/v1/datasets/{dataset.id}", headers=alice.headers).status_code == 204
    db.expunge_all()  # the handler deleted the row with a session of its own
    assert db.get(Dataset, dataset.id) is None
    response = client.get(f"/v1/datasets/{dataset.id}", headers=alice.headers)
    problem(response, 404, "dataset_not_found")


def test_a_dataset_that_jobs_refer_to_cannot_be_deleted(
    client: TestClient, db: Session, alice: Caller
) -> None:
    job = make_job(db, alice.tenant_id)
    response = client.delete(f"/v1/datasets/{job.dataset_id}", headers=alice.headers)
    problem(response, 409, "dataset_in_use")
    db.expire_all()
    assert db.get(Dataset, job.dataset_id) is not None


def test_a_refusal_names_the_users_file_never_the_spool(client: TestClient, alice: Caller) -> None:
    response = client.post(
        "/v1/datasets",
        headers=alice.headers,
        data={"format": "tensors"},
        files={"file": ("texts.jsonl", b'{"text": "a jsonl file sent as tensors"}\n')},
    )

    body = problem(response, 422, "invalid_dataset")
    assert "texts.jsonl" in body["detail"]
    assert "upload-" not in body["detail"]
