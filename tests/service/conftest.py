"""Service test fixtures: a real SQLite database migrated by Alembic, one transaction per test.

Every test runs inside an outer transaction on one connection that is rolled back afterwards.
The test's session (`db`) and the handlers' sessions each work in savepoints inside it: their
`commit()`s release a savepoint, so the factories (`factories.py`) commit what they make, as the
rows a request finds would be. The queue is replaced by a recorder (no broker here:
tests/integration runs real workers).
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.cli.migrate import upgrade
from service.core import db as service_db
from service.core import queue
from service.core import store as service_store
from service.core.settings import Settings, get_settings
from service.core.store import ArtifactStore, store_from_url
from tests.service.factories import Caller, make_tenant
from tests.service.support import MAX_UPLOAD_BYTES, QueueRecorder


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
    """The store the app is given: a local one under the test's folder."""
    return store_from_url(settings.resolved_store_url())


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch, connection: Connection) -> QueueRecorder:
    recorder = QueueRecorder(connection)
    monkeypatch.setattr(queue, "enqueue_job", recorder.enqueue_job)
    monkeypatch.setattr(queue, "enqueue_validation", recorder.enqueue_validation)
    return recorder


@pytest.fixture
def app(
    settings: Settings, connection: Connection, store: ArtifactStore, queued: QueueRecorder
) -> FastAPI:
    # Handlers open sessions of their own on the test's connection: a handler's commit releases
    # a savepoint inside the test's transaction, and its rollback undoes only its own writes.
    sessions = sessionmaker(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    return create_app(sessions=sessions, store=store)


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
