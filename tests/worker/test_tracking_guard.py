"""What a tenant's tracking server can make a worker do: nothing the SSRF guard refuses. A URL
two parsers read differently, a redirect, and an `artifact_uri` pointing at the worker's own
disk each leave the internal host untouched and the worker's disk unwritten, with the job's
result saying why. Servers on 127.0.0.1 play the internal host; 127.0.0.2, allowed, the
tenant's server."""

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from service.core.settings import get_settings
from tests.worker import factories
from tests.worker.loopback import answer, body_of, serving
from worker.pipeline import tracking
from worker.pipeline.export import Exported

RESULT = factories.job_result(
    steps=[{"step": 1, "macs": 70, "params": 8, "loss": 2.2, "seconds_scoring": 0.1}]
)


@pytest.fixture
def tenant_host_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APOPTOSIS_WEBHOOK_ALLOW", '["127.0.0.2"]')
    monkeypatch.setenv("APOPTOSIS_TRACKING_TIMEOUT_SECONDS", "10")
    get_settings.cache_clear()


def _log(tracking_uri: str, exports: list[Exported] | None = None) -> dict[str, Any]:
    """The run as the job's result records it (JSON: the fields it has)."""
    spec = factories.spec(mlflow={"tracking_uri": tracking_uri, "experiment": "e"})
    return tracking.log_job(spec, RESULT, exports or []).model_dump()


def _fake_mlflow(artifact_uri: str, seen: list[tuple[str, str, bytes]]) -> Any:
    """Answers the REST calls of a run as an MLflow server would, with `artifact_uri`."""
    info = {"run_id": "run1", "run_uuid": "run1", "experiment_id": "1", "status": "RUNNING"}
    info |= {"artifact_uri": artifact_uri, "lifecycle_stage": "active"}

    def handle(request: BaseHTTPRequestHandler) -> None:
        seen.append((request.command, request.path, body_of(request)))
        path = request.path.split("?")[0]
        if path.endswith("/experiments/get-by-name"):
            error = {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no experiment"}
            reply: dict[str, Any] = error
            status = 404
        elif path.endswith("/experiments/create"):
            reply, status = {"experiment_id": "1"}, 200
        elif path.endswith(("/runs/create", "/runs/get")):
            reply, status = {"run": {"info": info, "data": {}}}, 200
        elif path.endswith("/runs/update"):
            reply, status = {"run_info": info | {"status": "FINISHED"}}, 200
        else:
            reply, status = {}, 200
        answer(request, status, json.dumps(reply).encode(), content_type="application/json")

    return handle


def test_a_uri_two_parsers_read_differently_reaches_no_internal_host() -> None:
    get_settings.cache_clear()
    with serving(lambda r: answer(r, 200, b'{"internal": "secret"}')) as internal:
        port = internal.server_address[1]

        logged = _log(f"http://127.0.0.1:{port}\\@[64:ff9b::7f00:1]/x")

    assert internal.requests == []
    assert "run_id" not in logged and "secret" not in logged["error"]
    assert "backslash" in logged["error"]


def test_a_redirect_from_the_tracking_server_is_not_followed(tenant_host_allowed: None) -> None:
    with serving(lambda r: answer(r, 200, b'{"internal": "secret"}')) as internal:

        def redirect(request: BaseHTTPRequestHandler) -> None:
            answer(request, 307, location=f"{internal.url}{request.path}")

        with serving(redirect, host="127.0.0.2") as server:
            logged = _log(server.url)

    assert internal.requests == []
    assert "run_id" not in logged and "HTTP 307" in logged["error"]
    assert "secret" not in logged["error"]


@pytest.mark.parametrize("scheme", ["file", "s3", "mlflow-artifacts-elsewhere"])
def test_artifacts_go_nowhere_the_tracking_server_names_but_its_proxy(
    tenant_host_allowed: None, tmp_path: Path, scheme: str
) -> None:
    target = tmp_path / "worker-disk"
    target.mkdir()
    artifact_uri = {
        "file": target.as_uri(),
        "s3": "s3://someone-elses-bucket/runs",
        "mlflow-artifacts-elsewhere": "mlflow-artifacts://127.0.0.1:9/1/run1/artifacts",
    }[scheme]
    model = tmp_path / "model.zip"
    model.write_bytes(b"weights")
    seen: list[tuple[str, str, bytes]] = []

    with serving(_fake_mlflow(artifact_uri, seen), host="127.0.0.2") as server:
        logged = _log(server.url, [Exported("safetensors", model)])

    assert list(target.iterdir()) == []
    assert logged["run_id"] == "run1"
    assert "artifact proxy" in logged["artifacts_error"]
    assert [method for method, _, _ in seen if method == "PUT"] == []
    assert any(path.endswith("/runs/update") for _, path, _ in seen)  # the run is finished


def test_artifacts_go_through_the_servers_proxy(tenant_host_allowed: None, tmp_path: Path) -> None:
    model = tmp_path / "model.zip"
    model.write_bytes(b"weights")
    seen: list[tuple[str, str, bytes]] = []

    with serving(_fake_mlflow("mlflow-artifacts:/1/run1/artifacts", seen), "127.0.0.2") as server:
        logged = _log(server.url, [Exported("safetensors", model)])

    assert "artifacts_error" not in logged and logged["run_id"] == "run1"
    puts = {path: body for method, path, body in seen if method == "PUT"}
    prefix = "/api/2.0/mlflow-artifacts/artifacts/1/run1/artifacts"
    assert puts[f"{prefix}/model/model.zip"] == b"weights"
    assert json.loads(puts[f"{prefix}/report.json"])["result"] == RESULT.model_dump(mode="json")
