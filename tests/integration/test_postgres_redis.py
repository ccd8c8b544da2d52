"""The production shape: Postgres, Redis, and the worker in its own process."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.client import Client
from tests.integration.flow import prune_bert_to_half_the_macs
from tests.integration.services import (
    REDIS_START,
    apoptosis,
    bert_upload,
    ensure_server,
    free_port,
    postgres_database,
    stop,
    wait_healthy,
)

REDIS_DB = 13


@pytest.fixture
def distributed(tmp_path: Path) -> Iterator[Client]:
    ensure_server(6379, REDIS_START)
    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    with postgres_database() as database_url:
        env = {
            "APOPTOSIS_DATABASE_URL": database_url,
            "APOPTOSIS_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
            "APOPTOSIS_STORE_URL": str(tmp_path / "store"),
            "APOPTOSIS_HOME": str(tmp_path / "home"),
        }
        assert apoptosis("migrate", env=env, log=tmp_path / "migrate.log").wait(60) == 0
        port = free_port()
        api = apoptosis("api", "--port", str(port), env=env, log=tmp_path / "api.log")
        worker = apoptosis("worker", "--queues", "cpu", env=env, log=tmp_path / "worker.log")
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, api, tmp_path / "api.log")
            from sqlalchemy.orm import Session

            from service.core.db import make_engine
            from service.tenants.auth import create_tenant

            engine = make_engine(database_url)
            with Session(engine) as session:
                _, key = create_tenant(session, "distributed")
                session.commit()
            engine.dispose()
            with Client(url, key) as client:
                yield client
        finally:
            stop(worker)
            stop(api)


def test_postgres_redis_and_a_separate_worker_prune_an_uploaded_bert(
    distributed: Client, tmp_path: Path
) -> None:
    archive, data = bert_upload(tmp_path)
    prune_bert_to_half_the_macs(distributed, archive, data, tmp_path)
