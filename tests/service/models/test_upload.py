"""POST /v1/models: streamed, capped, hashed uploads that end in the store and the queue."""

import hashlib
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.core import queue
from service.core.orm import Model
from service.core.settings import Settings, get_settings
from service.core.store import ArtifactStore, StoreFull, StoreUnavailable
from tests.service.factories import Caller, hf_archive, hf_archive_of_size
from tests.service.support import MAX_UPLOAD_BYTES, QueueRecorder, Response, leftover_files, problem

WEIGHTS = hf_archive(bytes(range(256)) * 1000)  # ~256 kB, every byte value


def upload(
    client: TestClient,
    caller: Caller,
    content: bytes,
    model_format: str = "hf",
    name: str | None = "resnet",
) -> Response:
    data = {"format": model_format} | ({"name": name} if name is not None else {})
    return client.post(
        "/v1/models",
        headers=caller.headers,
        data=data,
        files={"file": ("model.zip", content, "application/zip")},
    )


def test_an_upload_is_stored_hashed_and_queued_for_validation(
    client: TestClient,
    db: Session,
    settings: Settings,
    store: ArtifactStore,
    queued: QueueRecorder,
    alice: Caller,
) -> None:
    response = upload(client, alice, WEIGHTS)

    assert response.status_code == 201, response.text
    body = response.json()
    sha256 = hashlib.sha256(WEIGHTS).hexdigest()
    assert body["state"] == "validating"
    assert (body["name"], body["format"]) == ("resnet", "hf")
    assert (body["sha256"], body["size"]) == (sha256, len(WEIGHTS))
    model = db.get(Model, body["id"])
    assert model is not None
    assert (model.tenant_id, model.sha256, model.size) == (alice.tenant_id, sha256, len(WEIGHTS))
    with store.open(model.blob_key) as blob:
        assert blob.read() == WEIGHTS
    assert [(v.resource_id, v.committed, v.row_state) for v in queued.validations] == [
        (model.id, True, "validating")
    ]
    assert queued.jobs == []
    assert not list((settings.home / "tmp").iterdir()), "the spooled upload is removed"


def test_the_name_defaults_to_the_file_name(client: TestClient, alice: Caller) -> None:
    response = upload(client, alice, WEIGHTS, name=None)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "model.zip"


@pytest.mark.parametrize("size", [MAX_UPLOAD_BYTES + 1, 4 * MAX_UPLOAD_BYTES])
def test_an_upload_over_the_cap_is_413_and_leaves_nothing(
    client: TestClient,
    db: Session,
    settings: Settings,
    queued: QueueRecorder,
    alice: Caller,
    size: int,
) -> None:
    # MAX + 1 passes the Content-Length pre-check (which allows for form fields) and is stopped
    # while streaming; 4 × MAX is refused from its Content-Length alone.
    problem(upload(client, alice, b"\0" * size), 413, "upload_too_large")
    assert leftover_files(settings) == []
    assert db.scalar(select(func.count()).select_from(Model)) == 0
    assert queued.validations == []


def test_a_chunked_upload_over_the_cap_is_stopped_while_streaming(
    client: TestClient, settings: Settings, alice: Caller
) -> None:
    boundary = "apoptosis-test-boundary"

    def body() -> Iterator[bytes]:  # no Content-Length: only the streaming count can stop it
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="format"\r\n\r\nhf\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="big.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        for _ in range(2 * MAX_UPLOAD_BYTES // 65536):
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/v1/models",
        headers=alice.headers | {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=body(),
    )
    problem(response, 413, "upload_too_large")
    assert leftover_files(settings) == []


def test_exactly_the_cap_is_accepted(client: TestClient, alice: Caller) -> None:
    response = upload(client, alice, hf_archive_of_size(MAX_UPLOAD_BYTES))
    assert response.status_code == 201, response.text
    assert response.json()["size"] == MAX_UPLOAD_BYTES


@pytest.mark.parametrize(
    ("model_format", "content", "code"),
    [
        ("onnx", WEIGHTS, "unsupported_format"),
        ("", WEIGHTS, "unsupported_format"),
        ("torch_pickle", WEIGHTS, "unsafe_format"),
        ("hf", b"", "empty_file"),
    ],
)
def test_refused_uploads_are_422_and_leave_nothing(
    client: TestClient,
    db: Session,
    settings: Settings,
    queued: QueueRecorder,
    alice: Caller,
    model_format: str,
    content: bytes,
    code: str,
) -> None:
    problem(upload(client, alice, content, model_format), 422, code)
    assert leftover_files(settings) == []
    assert db.scalar(select(func.count()).select_from(Model)) == 0
    assert queued.validations == []


def test_torch_pickle_is_accepted_in_trusted_mode(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, alice: Caller
) -> None:
    monkeypatch.setenv("APOPTOSIS_TRUSTED_MODE", "true")
    get_settings.cache_clear()
    response = upload(client, alice, WEIGHTS, "torch_pickle")
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "torch_pickle"


def test_a_form_without_a_file_part_is_422(client: TestClient, alice: Caller) -> None:
    response = client.post(
        "/v1/models",
        headers=alice.headers,
        data={"format": "hf"},
        files={"other": ("x.bin", b"data", "application/octet-stream")},
    )
    problem(response, 422, "missing_file")


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/octet-stream", "multipart/form-data"]
)
def test_a_body_that_is_not_multipart_is_415(
    client: TestClient, settings: Settings, alice: Caller, content_type: str
) -> None:
    response = client.post(
        "/v1/models",
        headers=alice.headers | {"Content-Type": content_type},  # the last has no boundary
        content=b'{"format": "hf"}',
    )
    problem(response, 415, "unsupported_media_type")
    assert leftover_files(settings) == []


def test_uploads_need_a_key(client: TestClient, settings: Settings) -> None:
    response = client.post(
        "/v1/models", data={"format": "hf"}, files={"file": ("m.zip", WEIGHTS, "application/zip")}
    )
    problem(response, 401, "unauthenticated")
    assert leftover_files(settings) == []


def test_a_name_longer_than_its_column_is_refused(client: TestClient, alice: Caller) -> None:
    response = upload(client, alice, WEIGHTS, name="n" * 201)
    # Refusing the name and shortening it are both fine; storing what the column cannot hold is not.
    assert response.status_code == 422 or len(response.json()["name"]) <= 200


def test_a_form_with_two_file_parts_does_not_store_their_concatenation(
    client: TestClient, alice: Caller
) -> None:
    first, second = b"first file", b"second file"
    response = client.post(
        "/v1/models",
        headers=alice.headers,
        data={"format": "hf"},
        files=[("file", ("a.zip", first, "application/zip")), ("file", ("b.zip", second, "x/y"))],
    )
    # Refusing the form and keeping one of the files are both fine; mixing them is not.
    digests = {hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()}
    assert response.status_code == 422 or response.json()["sha256"] in digests


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (StoreUnavailable("ConnectTimeoutError"), 503, "store_unavailable"),
        (StoreFull(), 507, "insufficient_storage"),
    ],
)
def test_a_store_that_fails_is_a_problem_and_no_model(
    client: TestClient,
    db: Session,
    store: ArtifactStore,
    settings: Settings,
    alice: Caller,
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
    status: int,
    code: str,
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise failure

    monkeypatch.setattr(store, "put_stream", broken)

    response = upload(client, alice, WEIGHTS)

    problem(response, status, code)
    # a store that may come back is worth asking again in 30 s; a full one is not
    assert response.headers.get("retry-after") == ("30" if status == 503 else None)
    assert db.scalar(select(func.count()).select_from(Model)) == 0
    assert leftover_files(settings) == []


def test_a_broker_that_cannot_take_the_validation_still_stores_the_model(
    client: TestClient, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload is stored; the reaper sends the validation once the broker is back."""

    def down(_: str) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(queue, "enqueue_validation", down)

    response = upload(client, alice, WEIGHTS)

    assert response.status_code == 201 and response.json()["state"] == "validating"
