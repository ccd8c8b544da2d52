"""Request bodies are capped before they are read, by route and whatever their content type, and
a /v1 request without a key is answered before its body is read. "Unread" is measured: what the
app pulled from `receive` (`tests/service/streamed.py`), not inferred from the status."""

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.api.body_limit import KEYED_PREFIX, MAX_JSON_BYTES, BodyLimitMiddleware
from service.core.problems import ProblemError
from service.core.settings import Settings
from service.tenants.auth import current_tenant
from service.uploads.multipart import FORM_ALLOWANCE
from tests.service.factories import Caller, hf_archive
from tests.service.streamed import post
from tests.service.support import leftover_files, problem

CHUNK = 64 * 1024
OVER_THE_CAP = 4 * MAX_JSON_BYTES
MULTIPART = "multipart/form-data; boundary=b0undary"
PUBLIC = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/")


def body(size: int, chunked: bool) -> bytes | list[bytes]:
    """`size` bytes, whole (sent with a Content-Length) or in chunks (sent chunked)."""
    return [b"x" * CHUNK] * (size // CHUNK) if chunked else b"x" * size


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/v1/jobs", MULTIPART), ("/v1/jobs", "application/json"), ("/v1/models", MULTIPART)],
)
@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "apo_no-scheme"]
)
def test_a_body_without_a_well_formed_key_is_401_and_never_read(
    app: FastAPI,
    path: str,
    content_type: str,
    chunked: bool,
    authorization: str | None,
) -> None:
    headers = {"Content-Type": content_type}
    if authorization is not None:
        headers["Authorization"] = authorization

    response, pulled = post(app, path, headers, body(OVER_THE_CAP, chunked))

    problem(response, 401, "unauthenticated")
    assert pulled.bytes == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_a_multipart_body_over_the_cap_on_a_json_route_is_413_read_no_further(
    app: FastAPI, alice: Caller, chunked: bool
) -> None:
    headers = alice.headers | {"Content-Type": MULTIPART}

    response, pulled = post(app, "/v1/jobs", headers, body(OVER_THE_CAP, chunked))

    problem(response, 413, "body_too_large")
    # declared: refused from its length alone; chunked: cut at the chunk that passed the cap
    assert pulled.bytes == (MAX_JSON_BYTES + CHUNK if chunked else 0)


def test_a_well_formed_but_unknown_key_is_401_before_an_upload_is_read(app: FastAPI) -> None:
    # The upload routes solve the key (a database lookup) before they read the stream.
    headers = {"Authorization": "Bearer apo_not-a-key", "Content-Type": MULTIPART}

    response, pulled = post(app, "/v1/models", headers, body(OVER_THE_CAP, chunked=True))

    problem(response, 401, "invalid_api_key")
    assert pulled.bytes == 0


def test_a_declared_upload_over_its_cap_is_413_unread(
    app: FastAPI, alice: Caller, settings: Settings
) -> None:
    headers = alice.headers | {"Content-Type": MULTIPART}
    over = 4 * settings.max_upload_bytes

    response, pulled = post(app, "/v1/datasets", headers, body(over, chunked=False))

    problem(response, 413, "upload_too_large")
    assert pulled.bytes == 0


def test_an_upload_body_past_its_cap_is_cut_even_after_the_form_ended(
    app: FastAPI, alice: Caller, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # The parser skips what follows the closing boundary: only the body's own cap stops it.
    form = (
        b'--b0undary\r\nContent-Disposition: form-data; name="format"\r\n\r\nhf\r\n'
        b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="m.zip"\r\n\r\n'
        + hf_archive(b"\0" * 64)
        + b"\r\n--b0undary--\r\n"
    )
    cap = settings.max_upload_bytes + FORM_ALLOWANCE
    headers = alice.headers | {"Content-Type": MULTIPART}

    response, pulled = post(app, "/v1/models", headers, [form, *body(2 * cap, chunked=True)])

    problem(response, 413, "upload_too_large")
    assert cap < pulled.bytes <= cap + CHUNK
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert leftover_files(settings) == []


def test_the_door_answers_401_as_the_key_dependency_does(client: TestClient) -> None:
    door = problem(client.post("/v1/jobs", content=b"{}"), 401, "unauthenticated")
    sessions: sessionmaker[Session] = sessionmaker()
    with pytest.raises(ProblemError) as raised:
        current_tenant(sessions, None)
    assert (raised.value.status, raised.value.code) == (401, "unauthenticated")
    assert door["detail"] == raised.value.detail


def test_every_v1_operation_needs_a_key_and_the_rest_stay_public(
    app: FastAPI, client: TestClient
) -> None:
    # The door turns away /v1 requests without a key: that must close no public operation.
    # An operation that depends on the key declares the bearer scheme in the document.
    operations = [
        (path, method, operation)
        for path, methods in app.openapi()["paths"].items()
        for method, operation in methods.items()
    ]
    keyed = {(path, method) for path, method, operation in operations if operation.get("security")}
    assert {
        (path, method) for path, method, _ in operations if path.startswith(KEYED_PREFIX)
    } == keyed
    for path in PUBLIC:
        assert client.get(path).status_code != 401, path


def test_the_upload_routes_are_the_ones_with_multipart_bodies(app: FastAPI) -> None:
    # The body limit gives these routes the upload cap; every other route has the 1 MiB cap.
    multipart = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method, operation in operations.items()
        if "multipart/form-data" in operation.get("requestBody", {}).get("content", {})
    }
    [limit] = [m for m in app.user_middleware if m.cls is BodyLimitMiddleware]
    upload_paths = limit.kwargs["upload_paths"]
    assert isinstance(upload_paths, tuple)
    assert {("POST", path) for path in upload_paths} == multipart
