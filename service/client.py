"""Typed Python SDK for the Apoptosis HTTP API (the CLI uses it too)."""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from service.artifacts.schemas import ArtifactOut
from service.datasets.schemas import DatasetOut
from service.jobs.schemas import JobOut
from service.jobs.states import TERMINAL
from service.models.schemas import ModelOut
from service.models.states import ModelState


class ApiError(Exception):
    """A problem+json answer: `status`, stable `code`, human `detail`."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.body = status, code, detail, body


class Client:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}"},
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_success or response.status_code == 304:
            return response
        try:
            body = response.json()
        except ValueError:
            body = {"code": "http_error", "detail": response.text}
        raise ApiError(
            response.status_code,
            str(body.get("code", "http_error")),
            str(body.get("detail", "")),
            body,
        )

    def _upload(self, path: str, file: Path, fields: dict[str, str]) -> dict[str, Any]:
        with file.open("rb") as stream:
            response = self._http.post(
                path, data=fields, files={"file": (file.name, stream)}, timeout=None
            )
        return dict(self._check(response).json())

    def upload_model(
        self, file: Path, model_format: str = "hf", name: str | None = None
    ) -> ModelOut:
        fields = {"format": model_format, **({"name": name} if name else {})}
        return ModelOut.model_validate(self._upload("/v1/models", file, fields))

    def model(self, model_id: str) -> ModelOut:
        return ModelOut.model_validate(self._check(self._http.get(f"/v1/models/{model_id}")).json())

    def wait_for_model(self, model_id: str, timeout: float = 300.0) -> ModelOut:
        deadline = time.monotonic() + timeout
        while (model := self.model(model_id)).state == ModelState.VALIDATING:
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {model_id} still validating after {timeout}s")
            time.sleep(0.5)
        return model

    def upload_dataset(
        self, file: Path, dataset_format: str = "tensors", name: str | None = None
    ) -> DatasetOut:
        fields = {"format": dataset_format, **({"name": name} if name else {})}
        return DatasetOut.model_validate(self._upload("/v1/datasets", file, fields))

    def submit_job(self, spec: dict[str, Any], idempotency_key: str | None = None) -> JobOut:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._http.post("/v1/jobs", json=spec, headers=headers)
        return JobOut.model_validate(self._check(response).json())

    def job(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._check(self._http.get(f"/v1/jobs/{job_id}")).json())

    def jobs(self, state: str | None = None, limit: int = 50) -> list[JobOut]:
        params: dict[str, Any] = {"limit": limit, **({"state": state} if state else {})}
        body = self._check(self._http.get("/v1/jobs", params=params)).json()
        return [JobOut.model_validate(item) for item in body["items"]]

    def cancel(self, job_id: str) -> JobOut:
        return JobOut.model_validate(
            self._check(self._http.post(f"/v1/jobs/{job_id}/cancel")).json()
        )

    def events(
        self, job_id: str, last_event_id: str | None = None, *, retries: int = 5
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) pairs from the job's Server-Sent Events until it ends. A dropped
        connection is resumed after the last event received (`Last-Event-ID`), up to `retries`
        times in a row; resume a stream of your own by passing `last_event_id`."""
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with connect_sse(
                    self._http, "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=None
                ) as source:
                    if not source.response.is_success:
                        source.response.read()
                        self._check(source.response)
                    for event in source.iter_sse():
                        failures = 0
                        last_event_id = event.id or last_event_id
                        yield event.event, event.json()
                return
            except httpx.TransportError:
                failures += 1
                if failures > retries:
                    raise
                time.sleep(min(0.1 * 2**failures, 5.0))

    def wait(self, job_id: str) -> JobOut:
        for _ in self.events(job_id):
            pass
        job = self.job(job_id)
        while job.state not in TERMINAL:  # the stream can end early on a dropped connection
            time.sleep(0.5)
            job = self.job(job_id)
        return job

    def artifacts(self, job_id: str) -> list[ArtifactOut]:
        body = self._check(self._http.get(f"/v1/jobs/{job_id}/artifacts")).json()
        return [ArtifactOut.model_validate(item) for item in body]

    def download(self, artifact: ArtifactOut, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / Path(artifact.filename).name
        with self._http.stream(
            "GET", f"/v1/artifacts/{artifact.id}/content", timeout=None
        ) as response:
            self._check(response)
            with target.open("wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
        return target
