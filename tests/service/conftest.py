"""Service test fixtures: a real SQLite database migrated by Alembic, one transaction per test.

Every test runs inside an outer transaction on one connection that is rolled back afterwards.
The test's session (`db`) and the handlers' sessions each work in savepoints inside it: their
`commit()`s release a savepoint, so the factories below commit what they make, as the rows a
request finds would be. The queue is replaced by a
recorder (no broker here: tests/integration runs real workers). The factories below are plain
functions that tests import from this module.
"""

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Connection, Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from service import db as service_db
from service import queue
from service import store as service_store
from service.app import create_app
from service.auth import create_tenant
from service.jobs.states import JobState
from service.migrate import upgrade
from service.orm import Artifact, Dataset, Job, Model
from service.settings import Settings, get_settings
from service.store import ArtifactStore

# Starlette's TestClient answers with httpx2's or httpx's Response, by what is installed.
Response = Any
MAX_UPLOAD_BYTES = 1024 * 1024
WORKER = "worker-1"
SPEC: dict[str, Any] = {"target": {"macs": 0.5}}  # plus model_id and dataset_id


# --- factories -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """A tenant and one of its API keys, as a client holds it."""

    tenant_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_tenant(session: Session, name: str = "tenant") -> Caller:
    tenant, key = create_tenant(session, name)
    session.commit()
    return Caller(tenant.id, key)


def _digest(content: bytes) -> tuple[str, str]:
    sha = hashlib.sha256(content).hexdigest()
    return sha, f"sha256/{sha[:2]}/{sha}"


def make_model(
    session: Session,
    tenant_id: str,
    *,
    state: str = "ready",
    name: str = "model",
    created_at: datetime | None = None,
) -> Model:
    sha, key = _digest(name.encode())
    model = Model(
        tenant_id=tenant_id,
        name=name,
        format="hf",
        state=state,
        blob_key=key,
        sha256=sha,
        size=len(name),
    )
    if created_at is not None:
        model.created_at = created_at
    session.add(model)
    session.commit()
    return model


def make_dataset(
    session: Session, tenant_id: str, *, name: str = "data", created_at: datetime | None = None
) -> Dataset:
    sha, key = _digest(name.encode())
    dataset = Dataset(
        tenant_id=tenant_id, name=name, format="tensors", blob_key=key, sha256=sha, size=len(name)
    )
    if created_at is not None:
        dataset.created_at = created_at
    session.add(dataset)
    session.commit()
    return dataset


def make_job(
    session: Session,
    tenant_id: str,
    state: str = "queued",
    *,
    model: Model | None = None,
    dataset: Dataset | None = None,
    created_at: datetime | None = None,
) -> Job:
    """A job row in `state`; running and cancelling jobs hold WORKER's lease."""
    model = model or make_model(session, tenant_id)
    dataset = dataset or make_dataset(session, tenant_id)
    leased = state in (JobState.RUNNING, JobState.CANCELLING)
    job = Job(
        tenant_id=tenant_id,
        model_id=model.id,
        dataset_id=dataset.id,
        spec={**SPEC, "model_id": model.id, "dataset_id": dataset.id},
        state=state,
        attempt=1 if leased else 0,
        lease_owner=WORKER if leased else None,
    )
    if created_at is not None:
        job.created_at = created_at
    session.add(job)
    session.commit()
    return job


def make_artifact(session: Session, store: ArtifactStore, job: Job, content: bytes) -> Artifact:
    blob = store.put_stream([content])
    artifact = Artifact(
        tenant_id=job.tenant_id,
        job_id=job.id,
        format="hf",
        filename="pruned.zip",
        blob_key=blob.key,
        sha256=blob.sha256,
        size=blob.size,
    )
    session.add(artifact)
    session.commit()
    return artifact


def problem(response: Response, status: int, code: str) -> dict[str, Any]:
    """Assert that `response` is an RFC 9457 problem with `status` and `code`; return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith(f"/{code}")
    return body


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


# --- the queue -----------------------------------------------------------------------------


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


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('database') / 'apoptosis.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = service_db.make_engine(database_url)

    # pysqlite's own transaction handling ignores SAVEPOINTs; let SQLAlchemy issue BEGIN itself
    # (the documented recipe), so that handlers' commits release savepoints, not the test's
    # outer transaction.
    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")

    yield engine
    engine.dispose()


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as connection:
        outer = connection.begin()
        yield connection
        outer.rollback()


@pytest.fixture
def db(connection: Connection) -> Iterator[Session]:
    """The session the API's handlers use too (see `app`)."""
    session = Session(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    yield session
    session.close()


@pytest.fixture
def settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> Iterator[Settings]:
    monkeypatch.setenv("APOPTOSIS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("APOPTOSIS_STORE_URL", str(tmp_path / "store"))
    monkeypatch.setenv("APOPTOSIS_DATABASE_URL", database_url)
    monkeypatch.setenv("APOPTOSIS_MAX_UPLOAD_BYTES", str(MAX_UPLOAD_BYTES))
    monkeypatch.delenv("APOPTOSIS_TRUSTED_MODE", raising=False)
    monkeypatch.delenv("APOPTOSIS_JOB_QUEUE", raising=False)
    _clear_caches()
    yield get_settings()
    _clear_caches()


def _clear_caches() -> None:
    if service_db.get_engine.cache_info().currsize:
        service_db.get_engine().dispose()
    for cached in (
        get_settings,
        service_store.get_store,
        service_db.get_engine,
        service_db.get_sessionmaker,
    ):
        cached.cache_clear()


@pytest.fixture
def store(settings: Settings) -> ArtifactStore:
    return service_store.get_store()


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch, connection: Connection) -> QueueRecorder:
    recorder = QueueRecorder(connection)
    monkeypatch.setattr(queue, "enqueue_job", recorder.enqueue_job)
    monkeypatch.setattr(queue, "enqueue_validation", recorder.enqueue_validation)
    return recorder


@pytest.fixture
def app(settings: Settings, connection: Connection, queued: QueueRecorder) -> FastAPI:
    app = create_app()
    # Handlers open sessions of their own on the test's connection: a handler's commit releases
    # a savepoint inside the test's transaction, and its rollback undoes only its own writes.
    sessions = sessionmaker(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    app.dependency_overrides[service_db.session_factory] = lambda: sessions
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


@pytest.fixture
def alice(db: Session) -> Caller:
    return make_tenant(db, "alice")


@pytest.fixture
def bob(db: Session) -> Caller:
    return make_tenant(db, "bob")
