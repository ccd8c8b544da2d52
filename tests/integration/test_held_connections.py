"""The API keeps answering while clients hold more stalled uploads and more open event streams
than its database pool has connections (SQLite: 5 + 10 overflow; Postgres: 10 + 20).

Before the fix, each of these requests held a pooled connection from its key check until its
response ended, and the key check waited for the pool on the event loop: 16 stalled uploads froze
every endpoint, `/healthz` included. So each held request counts only once the server has taken it
past its key check, seen from outside: an upload's spool file exists, a stream sent its first event.
"""

import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session

from service.cli.migrate import upgrade
from service.core.db import make_engine
from service.core.orm import Dataset, Job, Model
from service.jobs import repository
from service.tenants.auth import create_tenant
from tests.integration.services import (
    apoptosis,
    free_port,
    postgres_database,
    stop,
    until,
    wait_healthy,
)

HELD = 40  # more than either pool holds (and fewer than a tenant's uploads per minute)
# The contract is a time: the API answers while the connections are held, where a request starved
# of a pooled connection waits out the pool's 30 s timeout. 10 s is far from that, and leaves a
# loaded 2-core machine room for a request that takes milliseconds unloaded.
ANSWER_WITHIN_S = 10.0
# How long one held request may take to get past its key check; with the bug the 16th never does.
ADMITTED_WITHIN_S = 30.0
BOUNDARY = "held"


@dataclass(frozen=True)
class Api:
    url: str
    key: str
    job_id: str
    spool: Path  # where uploads spool their files, once past their key check and quota


def _seed(database_url: str) -> tuple[str, str]:
    """A tenant and its key, and a running job (its event stream stays open); (key, job id)."""
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            tenant, key = create_tenant(session, "held")
            blob = {"blob_key": "sha256/00/" + "0" * 64, "sha256": "0" * 64, "size": 1}
            model = Model(tenant_id=tenant.id, name="m", format="hf", state="ready", **blob)
            dataset = Dataset(tenant_id=tenant.id, name="d", format="tensors", **blob)
            session.add_all([model, dataset])
            session.flush()
            spec = {"model_id": model.id, "dataset_id": dataset.id, "target": {"macs": 0.5}}
            job = Job(
                tenant_id=tenant.id,
                model_id=model.id,
                dataset_id=dataset.id,
                spec=spec,
                state="running",
            )
            session.add(job)
            session.flush()
            repository.add_event(session, job.id, "state", {"state": "running"})
            session.commit()
            return key, job.id
    finally:
        engine.dispose()


@contextmanager
def _database(kind: str, folder: Path) -> Iterator[str]:
    if kind == "postgres":
        with postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{folder / 'apoptosis.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    with _database(request.param, tmp_path) as database_url:
        key, job_id = _seed(database_url)
        env = {
            "APOPTOSIS_DATABASE_URL": database_url,
            "APOPTOSIS_HOME": str(tmp_path / "home"),
            "APOPTOSIS_STORE_URL": str(tmp_path / "store"),
        }
        port = free_port()
        log = tmp_path / "api.log"
        process = apoptosis("api", "--port", str(port), env=env, log=log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, process, log)
            yield Api(url, key, job_id, tmp_path / "home" / "tmp")
        finally:
            stop(process)


def _connect(api: Api, head: str) -> socket.socket:
    port = int(api.url.rsplit(":", 1)[1])
    connection = socket.create_connection(("127.0.0.1", port), timeout=ADMITTED_WITHIN_S)
    connection.sendall(head.encode())
    return connection


def _spooled(api: Api) -> int:
    return len(list(api.spool.glob("upload-*"))) if api.spool.exists() else 0


@contextmanager
def stalled_upload(api: Api) -> Iterator[socket.socket]:
    """A model upload that sends its headers and the start of its file, then nothing more;
    entered once the server spools its file (the upload passed its key check and waits)."""
    part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="m.zip"\r\n'
        "Content-Type: application/zip\r\n\r\nPK"
    )
    spooled = _spooled(api)
    with _connect(
        api,
        f"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {api.key}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: 1000000\r\n\r\n{part}",
    ) as connection:
        until(
            lambda: _spooled(api) > spooled,
            ADMITTED_WITHIN_S,
            f"held upload {spooled + 1} past its key check",
            every=0.01,
        )
        yield connection


@contextmanager
def open_stream(api: Api) -> Iterator[socket.socket]:
    """An event stream of the running job, entered once it sent its first event (it passed its
    key check and its ownership check), then left open."""
    with _connect(
        api,
        f"GET /v1/jobs/{api.job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {api.key}\r\n\r\n",
    ) as connection:
        received = b""
        while b"event: state" not in received:
            try:
                chunk = connection.recv(4096)
            except TimeoutError:
                raise AssertionError(
                    f"a held stream sent no event within {ADMITTED_WITHIN_S:g} s: {received!r}"
                ) from None
            assert chunk, f"the stream closed early: {received!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received
        yield connection


def still_open(connection: socket.socket) -> bool:
    """The server has not closed the connection (a stream may have sent pings meanwhile)."""
    connection.setblocking(False)
    try:
        return connection.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:  # nothing to read, and no end of stream either
        return True


def answer_a_round(api: Api) -> None:
    """Ordinary requests, each answered 200 within ANSWER_WITHIN_S."""
    headers = {"Authorization": f"Bearer {api.key}"}
    with httpx.Client(base_url=api.url, headers=headers, timeout=ANSWER_WITHIN_S) as client:
        for path in ("/healthz", f"/v1/jobs/{api.job_id}", "/v1/models", "/v1/datasets") * 3:
            try:
                response = client.get(path)
            except httpx.TimeoutException:
                raise AssertionError(
                    f"{path} did not answer within {ANSWER_WITHIN_S:g} s"
                ) from None
            assert response.status_code == 200, (path, response.text)


@pytest.mark.parametrize("hold", [stalled_upload, open_stream], ids=["uploads", "streams"])
def test_other_requests_answer_while_connections_are_held(
    api: Api, hold: Callable[[Api], AbstractContextManager[socket.socket]]
) -> None:
    with ExitStack() as held:
        connections = [held.enter_context(hold(api)) for _ in range(HELD)]
        answer_a_round(api)
        # the round ran while every request was held, not after some gave up
        assert all(still_open(connection) for connection in connections)
        if hold is stalled_upload:
            assert _spooled(api) == HELD
