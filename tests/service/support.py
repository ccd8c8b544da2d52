"""Helpers the service tests share: problem answers, listings, leftovers, metrics, and the
recorder that stands in for the queue."""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Connection, select

from service.core.orm import Dataset, Job, Model
from service.core.settings import Settings
from tests.service.factories import Caller

# Starlette's TestClient answers with httpx2's or httpx's Response, by what is installed.
Response = Any
MAX_UPLOAD_BYTES = 1024 * 1024


def problem(response: Response, status: int, code: str) -> dict[str, Any]:
    """Assert that `response` is an RFC 9457 problem with `status` and `code`; return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith(f"/{code}")
    return body


def latin1_get(app: FastAPI, url: str, headers: dict[str, str]) -> httpx.Response:
    """GET `url` with the header values sent as latin-1 bytes, as an HTTP server hands them to
    the app. (Starlette's TestClient re-encodes them as UTF-8: the app reads 'Â²' for '²'.)"""

    async def get() -> httpx.Response:
        raw = {name.encode(): value.encode("latin-1") for name, value in headers.items()}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get(url, headers=raw)

    return asyncio.run(get())


def leftover_files(settings: Settings) -> list[Path]:
    """Every file in the upload spool and the store: what a refused upload must not leave."""
    roots = (settings.home / "tmp", Path(settings.resolved_store_url()))
    return [path for root in roots if root.exists() for path in root.rglob("*") if path.is_file()]


def walk(
    client: TestClient, path: str, caller: Caller, limit: int, **params: str
) -> list[list[str]]:
    """The ids on each page of a paginated listing, following `next_cursor` to the end."""
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        query = {**params, "limit": str(limit)} | ({"cursor": cursor} if cursor else {})
        response = client.get(path, params=query, headers=caller.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append([item["id"] for item in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) <= 100, "the cursor does not advance"


def newest_first(rows: Sequence[Model | Dataset | Job]) -> list[str]:
    return [row.id for row in sorted(rows, key=lambda row: (row.created_at, row.id), reverse=True)]


def requests_counted(client: TestClient, method: str, route: str, status: int) -> float:
    """The value of apoptosis_http_requests_total for one label set, as /metrics shows it."""
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "apoptosis_http_requests":
            for sample in family.samples:
                labels = {"method": method, "route": route, "status": str(status)}
                if sample.name.endswith("_total") and sample.labels == labels:
                    return sample.value
    return 0.0


@dataclass
class Enqueued:
    """One message the API would have sent, and what the database held when it was sent."""

    resource_id: str
    queue: str
    committed: bool  # no savepoint of the request's session was open any more
    row_state: str | None  # the row's state as any reader of the connection saw it


@dataclass
class QueueRecorder:
    connection: Connection
    jobs: list[Enqueued] = field(default_factory=list)
    validations: list[Enqueued] = field(default_factory=list)

    def enqueue_job(self, job_id: str, queue_name: str) -> None:
        state = self.connection.scalar(select(Job.state).where(Job.id == job_id))
        committed = not self.connection.in_nested_transaction()
        self.jobs.append(Enqueued(job_id, queue_name, committed, state))

    def enqueue_validation(self, model_id: str) -> None:
        state = self.connection.scalar(select(Model.state).where(Model.id == model_id))
        committed = not self.connection.in_nested_transaction()
        self.validations.append(Enqueued(model_id, "cpu", committed, state))
