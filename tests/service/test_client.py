"""The SDK's retries (429/503 after Retry-After, dropped connections where replaying is safe),
its formats taken from files, and its errors."""

import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.client import ApiError, Client, formats, sdk

JOB = {
    "id": "j1",
    "state": "queued",
    "model_id": "m",
    "dataset_id": "d",
    "spec": {},
    "attempt": 0,
    "progress": {},
    "result": None,
    "error": None,
    "created_at": "2026-01-01T00:00:00Z",
    "started_at": None,
    "finished_at": None,
}
MODEL = {
    "id": "m",
    "name": "bert",
    "format": "hf",
    "state": "validating",
    "sha256": "0" * 64,
    "size": 3,
    "summary": {},
    "rejection_reason": None,
    "created_at": "2026-01-01T00:00:00Z",
}


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(sdk.time, "sleep", waits.append)
    return waits


def _client(server: httpx.MockTransport, retries: int = 5) -> Client:
    return Client("http://api", "key", transport=server, retries=retries)


def test_a_429_is_retried_after_its_retry_after(slept: list[float]) -> None:
    answers = [
        httpx.Response(429, headers={"retry-after": "7"}, json={"code": "too_many_jobs"}),
        httpx.Response(202, json=JOB),
    ]
    keys: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["idempotency-key"])
        return answers.pop(0)

    with _client(httpx.MockTransport(server)) as client:
        job = client.submit_job({"model_id": "m", "dataset_id": "d"})

    assert job.id == "j1"
    assert slept == [7.0]
    assert len(keys) == 2 and keys[0] == keys[1]  # one job, however often it is sent


def test_a_503_without_retry_after_backs_off_then_gives_up(slept: list[float]) -> None:
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"code": "broker_unavailable", "detail": "down"})

    with (
        _client(httpx.MockTransport(server), retries=3) as client,
        pytest.raises(ApiError) as error,
    ):
        client.job("j1")

    assert (error.value.status, error.value.code) == (503, "broker_unavailable")
    assert slept == [0.5, 1.0, 2.0]


def test_a_dropped_connection_is_retried_for_a_read_not_for_an_upload(
    slept: list[float], tmp_path: Path
) -> None:
    calls: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1 or request.method == "POST":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json=JOB)

    file = tmp_path / "bert.zip"
    with zipfile.ZipFile(file, "w") as bundle:
        bundle.writestr("config.json", "{}")
    with _client(httpx.MockTransport(server)) as client:
        assert client.job("j1").id == "j1"
        with pytest.raises(httpx.ConnectError):
            client.upload_model(file)  # it may have been stored: not sent twice

    assert calls == ["GET", "GET", "POST"]


def test_an_upload_refused_for_now_is_sent_again_whole(slept: list[float], tmp_path: Path) -> None:
    bodies: list[bytes] = []

    def server(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        if len(bodies) == 1:
            return httpx.Response(429, headers={"retry-after": "2"}, json={"code": "x"})
        return httpx.Response(201, json=MODEL)

    file = tmp_path / "weights.pt"
    file.write_bytes(b"weights")
    with _client(httpx.MockTransport(server)) as client:
        client.upload_model(file)

    assert len(bodies) == 2
    assert all(b"torch_pickle" in body and b"\r\n\r\nweights\r\n" in body for body in bodies)


@pytest.mark.parametrize(
    ("name", "members", "model", "dataset"),
    [
        ("bert.zip", ["config.json", "model.safetensors"], "hf", None),
        ("whole.pt", None, "torch_pickle", None),
        ("texts.jsonl", None, None, "jsonl"),
        ("rows.safetensors", None, None, "tensors"),
        ("images.zip", ["cat/1.png", "dog/2.png"], "hf", "imagefolder"),
    ],
)
def test_formats_are_taken_from_the_file(
    tmp_path: Path, name: str, members: list[str] | None, model: str, dataset: str
) -> None:
    path = tmp_path / name
    if members is None:
        path.write_bytes(b"x")
    else:
        with zipfile.ZipFile(path, "w") as bundle:
            for member in members:
                bundle.writestr(member, b"x")

    if model:
        assert formats.model_format(path) == model
    if dataset:
        assert formats.dataset_format(path) == dataset


@pytest.mark.parametrize("name", ["notes.txt", "table.csv"])
def test_a_file_of_no_known_format_names_itself_and_the_option(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("x")

    with pytest.raises(formats.UnknownFormat, match=rf"{name}.*--format"):
        formats.model_format(path)
    with pytest.raises(formats.UnknownFormat, match=rf"{name}.*--data-format"):
        formats.dataset_format(path)


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ({}, {"target": {"macs": 0.5}}),
        ({"target": {"params": 0.6}}, {"target": {"params": 0.6}}),
        (
            {"targets": [{"macs": 0.7}, {"macs": 0.4}]},
            {"targets": [{"macs": 0.7}, {"macs": 0.4}]},
        ),
    ],
)
def test_prune_submits_a_target_or_a_family_of_targets_as_given(
    tmp_path: Path, given: dict[str, Any], sent: dict[str, Any]
) -> None:
    """A family's `targets` go as they are: adding the default `target` beside them made every
    family submitted through the SDK a 422."""
    dataset = {k: MODEL[k] for k in ("id", "name", "sha256", "size", "created_at")}
    answers = {
        ("POST", "/v1/models"): {**MODEL, "state": "ready"},
        ("GET", "/v1/models/m"): {**MODEL, "state": "ready"},
        ("POST", "/v1/datasets"): {**dataset, "id": "d", "format": "tensors"},
        ("POST", "/v1/jobs"): JOB,
    }
    submitted: list[bytes] = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs":
            submitted.append(request.content)
        return httpx.Response(200, json=answers[request.method, request.url.path])

    (tmp_path / "model.zip").write_bytes(b"PK")
    (tmp_path / "data.safetensors").write_bytes(b"{}")
    with _client(httpx.MockTransport(server)) as client:
        client.prune(
            tmp_path / "model.zip",
            tmp_path / "data.safetensors",
            model_format="hf",
            wait=False,
            **given,
        )

    [body] = submitted
    assert httpx.Response(200, content=body).json() == {"model_id": "m", "dataset_id": "d", **sent}
