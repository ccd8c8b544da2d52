"""Typed Python SDK for the Apoptosis HTTP API (the CLI uses it too). Its models are the API's
own pydantic schemas. Answers 429 and 503 are retried after their `Retry-After` (or with
backoff), as are dropped connections where a retry cannot run anything twice."""

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from service.artifacts.schemas import ArtifactOut
from service.client import formats
from service.datasets.schemas import DatasetOut, DatasetPage
from service.jobs.schemas import JobOut, JobPage, JobReport
from service.jobs.states import TERMINAL
from service.models.schemas import ModelOut, ModelPage
from service.models.states import ModelState
from service.webhooks.schemas import DeliveryOut

RETRIED_STATUSES = (429, 503)
MAX_RETRY_WAIT = 60.0


class ApiError(Exception):
    """A problem+json answer: `status`, stable `code`, human `detail`."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.body = status, code, detail, body


class JobFailed(Exception):
    """A job waited for ended other than succeeded; `job.error` says why."""

    def __init__(self, job: JobOut) -> None:
        error = job.error
        detail = f"{error.code}: {error.message}" if error else job.state
        super().__init__(f"job {job.id} {job.state}: {detail}")
        self.job = job


@dataclass(frozen=True)
class PruneResult:
    """What `Client.prune` did: the inputs it uploaded, the finished job, its artifacts and
    the files they were downloaded to (none without `output`)."""

    model: ModelOut
    dataset: DatasetOut
    job: JobOut
    artifacts: list[ArtifactOut] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


class Client:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retries = retries
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

    # --- transport ---------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, *, replayable: bool | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send, retrying 429/503 after `Retry-After`, and dropped connections when the request
        is `replayable` (default: every method but POST)."""
        return self._retrying(
            lambda: self._http.request(method, path, **kwargs), method, replayable
        )

    def _retrying(
        self, send: Callable[[], httpx.Response], method: str, replayable: bool | None
    ) -> httpx.Response:
        replayable = method != "POST" if replayable is None else replayable
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = send()
            except httpx.TransportError:
                if last or not replayable:
                    raise
                time.sleep(_backoff(attempt))
                continue
            if response.status_code not in RETRIED_STATUSES or last:
                return self._check(response)
            time.sleep(_retry_after(response) or _backoff(attempt))
        raise AssertionError("unreachable")

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

    def _get(self, path: str, schema: type[Any], **params: Any) -> Any:
        response = self._request("GET", path, params={k: v for k, v in params.items() if v})
        return schema.model_validate(response.json())

    def _upload(self, path: str, file: Path, fields: dict[str, str]) -> dict[str, Any]:
        def send() -> httpx.Response:  # each attempt reads the file from its start
            with file.open("rb") as stream:
                return self._http.post(
                    path,
                    data=fields,
                    files={"file": (file.name, stream, "application/octet-stream")},
                    timeout=None,
                )

        # A refused upload (429, 503) stored nothing: sending it again is safe.
        return dict(self._retrying(send, "POST", replayable=False).json())

    # --- models and datasets -------------------------------------------------------------------

    def upload_model(
        self, file: Path, model_format: str | None = None, name: str | None = None
    ) -> ModelOut:
        """Upload a model; its format is taken from the file when not given."""
        fields = {"format": model_format or formats.model_format(file)}
        fields |= {"name": name} if name else {}
        return ModelOut.model_validate(self._upload("/v1/models", file, fields))

    def model(self, model_id: str) -> ModelOut:
        return ModelOut.model_validate(self._request("GET", f"/v1/models/{model_id}").json())

    def models(self, limit: int = 50, cursor: str | None = None) -> ModelPage:
        page: ModelPage = self._get("/v1/models", ModelPage, limit=limit, cursor=cursor)
        return page

    def delete_model(self, model_id: str) -> None:
        self._request("DELETE", f"/v1/models/{model_id}")

    def wait_for_model(self, model_id: str, timeout: float = 300.0) -> ModelOut:
        deadline = time.monotonic() + timeout
        while (model := self.model(model_id)).state == ModelState.VALIDATING:
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {model_id} still validating after {timeout}s")
            time.sleep(0.5)
        return model

    def upload_dataset(
        self, file: Path, dataset_format: str | None = None, name: str | None = None
    ) -> DatasetOut:
        """Upload a dataset; its format is taken from the file when not given."""
        fields = {"format": dataset_format or formats.dataset_format(file)}
        fields |= {"name": name} if name else {}
        return DatasetOut.model_validate(self._upload("/v1/datasets", file, fields))

    def dataset(self, dataset_id: str) -> DatasetOut:
        response = self._request("GET", f"/v1/datasets/{dataset_id}")
        return DatasetOut.model_validate(response.json())

    def datasets(self, limit: int = 50, cursor: str | None = None) -> DatasetPage:
        page: DatasetPage = self._get("/v1/datasets", DatasetPage, limit=limit, cursor=cursor)
        return page

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    # --- jobs ----------------------------------------------------------------------------------

    def submit_job(self, spec: dict[str, Any], idempotency_key: str | None = None) -> JobOut:
        """Submit a job. The Idempotency-Key (one is made when not given) makes a retry after a
        dropped connection return the same job instead of starting a second."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        response = self._request("POST", "/v1/jobs", json=spec, headers=headers, replayable=True)
        return JobOut.model_validate(response.json())

    def job(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def jobs(
        self, state: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> list[JobOut]:
        return self.jobs_page(state, limit, cursor).items

    def jobs_page(
        self, state: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> JobPage:
        page: JobPage = self._get("/v1/jobs", JobPage, state=state, limit=limit, cursor=cursor)
        return page

    def cancel(self, job_id: str) -> JobOut:
        response = self._request("POST", f"/v1/jobs/{job_id}/cancel", replayable=True)
        return JobOut.model_validate(response.json())

    def delete_job(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def report(self, job_id: str) -> JobReport:
        return JobReport.model_validate(self._request("GET", f"/v1/jobs/{job_id}/report").json())

    def deliveries(self, job_id: str) -> list[DeliveryOut]:
        body = self._request("GET", f"/v1/jobs/{job_id}/deliveries").json()
        return [DeliveryOut.model_validate(item) for item in body]

    def webhook_secret(self, *, rotate: bool = False) -> str:
        if rotate:
            response = self._request("POST", "/v1/webhooks/secret/rotate", replayable=True)
        else:
            response = self._request("GET", "/v1/webhooks/secret")
        return str(response.json()["secret"])

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
                        if not event.data:
                            # A keep-alive comment (": ping", sent after 15 s without events):
                            # httpx-sse reports one that follows an event with an id as an
                            # empty message, where the SSE spec dispatches nothing.
                            continue
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

    # --- artifacts -----------------------------------------------------------------------------

    def artifacts(self, job_id: str) -> list[ArtifactOut]:
        body = self._request("GET", f"/v1/jobs/{job_id}/artifacts").json()
        return [ArtifactOut.model_validate(item) for item in body]

    def download(self, artifact: ArtifactOut, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / Path(artifact.filename).name
        with self._http.stream(
            "GET", f"/v1/artifacts/{artifact.id}/content", timeout=None
        ) as response:
            if not response.is_success:
                response.read()
                self._check(response)
            with target.open("wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
        return target

    # --- the whole round -----------------------------------------------------------------------

    def prune(
        self,
        model_path: Path,
        data_path: Path,
        *,
        target: dict[str, float] | None = None,
        output: Path | None = None,
        wait: bool = True,
        model_format: str | None = None,
        data_format: str | None = None,
        **spec: Any,
    ) -> PruneResult:
        """Upload the model and the data, submit a job (`target`, default half the MACs, or a
        family's `targets`, and any other job-spec field as a keyword), wait for it and
        download its artifacts into `output`. Raises `JobFailed` when the job fails or is
        cancelled; with `wait=False`, returns as soon as the job is queued."""
        model = self.wait_for_model(self.upload_model(Path(model_path), model_format).id)
        if model.state != ModelState.READY:
            reason = model.rejection_reason or model.state
            raise ApiError(422, reason.split(":")[0], f"{model_path}: {reason}", {})
        dataset = self.upload_dataset(Path(data_path), data_format)
        job_spec = {"model_id": model.id, "dataset_id": dataset.id, **spec}
        if target is not None or "targets" not in spec:  # a family's last target is its own
            job_spec["target"] = target or {"macs": 0.5}
        job = self.submit_job(job_spec)
        if not wait:
            return PruneResult(model, dataset, job)
        job = self.wait(job.id)
        if job.state != "succeeded":
            raise JobFailed(job)
        artifacts = self.artifacts(job.id)
        files = [self.download(a, Path(output)) for a in artifacts] if output else []
        return PruneResult(model, dataset, job, artifacts, files)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return min(float(value), MAX_RETRY_WAIT) if value.isdigit() else None


def _backoff(attempt: int) -> float:
    return float(min(0.5 * 2**attempt, MAX_RETRY_WAIT))
