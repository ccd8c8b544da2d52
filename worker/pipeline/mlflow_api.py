"""The part of MLflow's REST API a job's run needs, spoken through the guarded outbound client.

MLflow's own Python client reads its URL with another parser than our guard, follows
redirects, reads whole replies, sends the worker's MLflow credentials to whatever server a
tenant names, and writes artifacts wherever the server's `artifact_uri` points (a local folder,
an S3 bucket with the worker's keys). Its session cannot be held to DESIGN §7, and the API a run
needs is five calls, so we speak it ourselves: every call goes to the URL the guard checked, and
artifacts only through the server's proxied artifact API (`mlflow-artifacts:`).
"""

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from service.outbound import client, guard

API = "/api/2.0/mlflow"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
MAX_REPLY_BYTES = 1024 * 1024  # a run's JSON is a few KiB
UPLOAD_BYTES_PER_SECOND = 1024 * 1024  # an artifact upload's deadline grows with its size
# log-batch takes at most 1,000 metrics and 100 params a call (MLflow's REST API limits)
MAX_METRICS, MAX_PARAMS = 1000, 100


class TrackingError(Exception):
    """The tracking server did not do what was asked; the message says what it answered."""


class ArtifactsRefused(TrackingError):
    """The run's artifacts live where the worker must not write."""


class TrackingServer:
    def __init__(self, tracking_uri: str, allow: list[str], deadline: float) -> None:
        self.base = tracking_uri.rstrip("/")
        self.allow = allow
        self.deadline = deadline

    def experiment_id(self, name: str) -> str:
        """The experiment called `name`, made if the server has none."""
        found = self._call(
            "GET", f"/experiments/get-by-name?{urlencode({'experiment_name': name})}"
        )
        if found is not None:
            return str(found["experiment"]["experiment_id"])
        return str(self._call("POST", "/experiments/create", {"name": name})["experiment_id"])

    def create_run(self, experiment_id: str, run_name: str | None, start_ms: int) -> dict[str, Any]:
        """The new run's `info` (`run_id`, `artifact_uri`, …)."""
        body: dict[str, Any] = {"experiment_id": experiment_id, "start_time": start_ms}
        if run_name:
            body["run_name"] = run_name
        return dict(self._call("POST", "/runs/create", body)["run"]["info"])

    def log_batch(
        self, run_id: str, metrics: list[dict[str, Any]], params: list[dict[str, str]]
    ) -> None:
        for start in range(0, len(params), MAX_PARAMS):
            chunk = params[start : start + MAX_PARAMS]
            self._call("POST", "/runs/log-batch", {"run_id": run_id, "params": chunk})
        for start in range(0, len(metrics), MAX_METRICS):
            chunk = metrics[start : start + MAX_METRICS]
            self._call("POST", "/runs/log-batch", {"run_id": run_id, "metrics": chunk})

    def finish(self, run_id: str, end_ms: int) -> None:
        body = {"run_id": run_id, "status": "FINISHED", "end_time": end_ms}
        self._call("POST", "/runs/update", body)

    def upload(self, artifact_uri: str, local: Path, artifact_path: str = "") -> None:
        """PUT `local` into the run's artifacts through the server's artifact proxy."""
        folder = proxied_artifact_path(artifact_uri, self.base)
        parts = [folder, artifact_path, local.name]
        path = "/".join(quote(part.strip("/")) for part in parts if part.strip("/"))
        size = local.stat().st_size
        reply = self._send(
            "PUT",
            f"{ARTIFACTS_API}/{path}",
            content=_chunks(local),
            headers={"content-type": "application/octet-stream", "content-length": str(size)},
            deadline=self.deadline + size / UPLOAD_BYTES_PER_SECOND,
        )
        if not reply.ok:
            raise TrackingError(f"uploading {local.name}: {reply.summary()}")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """A REST call's JSON answer; None for a 404 RESOURCE_DOES_NOT_EXIST."""
        content = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if body is not None else {}
        reply = self._send(method, API + path, content=content, headers=headers)
        if reply.status == 404 and b"RESOURCE_DOES_NOT_EXIST" in reply.body:
            return None
        if not reply.ok:
            raise TrackingError(f"{method} {API}{path.split('?')[0]}: {reply.summary()}")
        if reply.truncated:
            raise TrackingError(f"{method} {API}{path}: the answer passed {MAX_REPLY_BYTES} bytes")
        try:
            return json.loads(reply.body or b"{}")
        except ValueError as error:
            raise TrackingError(f"{method} {API}{path}: not JSON: {reply.summary()}") from error

    def _send(
        self,
        method: str,
        path: str,
        *,
        content: bytes | AsyncIterator[bytes] | None,
        headers: dict[str, str],
        deadline: float | None = None,
    ) -> client.Reply:
        try:
            return client.request(
                method,
                self.base + path,
                self.allow,
                deadline=deadline or self.deadline,
                max_reply=MAX_REPLY_BYTES,
                content=content,
                headers=headers,
            )
        except guard.TargetRefused as error:
            raise TrackingError(f"mlflow.tracking_uri: {error}") from error
        except client.OutboundError as error:
            raise TrackingError(f"{method} {path.split('?')[0]}: {error}") from error


def proxied_artifact_path(artifact_uri: str, tracking_uri: str) -> str:
    """The path under the server's artifact proxy of a run's `mlflow-artifacts:` URI; any
    other location (a folder, a bucket, another host) is refused: the worker writes only
    through the tracking server it checked."""
    scheme, _, rest = artifact_uri.partition(":")
    if rest.startswith("//"):  # mlflow-artifacts://host:port/path: only the server itself
        netloc, _, path = rest[2:].partition("/")
        same_host = netloc == tracking_uri.split("://", 1)[-1].split("/", 1)[0]
        rest = "/" + path if same_host else rest
    if scheme != "mlflow-artifacts" or rest.startswith("//") or ".." in rest.split("/"):
        raise ArtifactsRefused(
            f"the tracking server keeps this run's artifacts at {artifact_uri[:200]!r}; the "
            "worker uploads only through the server's artifact proxy (mlflow-artifacts:, "
            "`mlflow server --serve-artifacts`)"
        )
    return rest


async def _chunks(path: Path, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(size):
            yield chunk
