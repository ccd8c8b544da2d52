"""The migrations build the schema the ORM declares: no drift between them (SQLite and Postgres)."""

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, text

from service.cli.migrate import alembic_config, upgrade
from service.core.db import make_engine
from service.core.orm import Base

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def migrated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgres":
        from tests.integration.services import postgres_database

        with postgres_database() as url:
            upgrade(url)
            engine = make_engine(url)
            yield engine
            engine.dispose()
        return
    url = f"sqlite:///{tmp_path / 'drift.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def test_the_migrated_schema_is_the_orms(migrated: Engine) -> None:
    with migrated.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_blobs_stored_before_the_blob_table_are_recorded(tmp_path: Path) -> None:
    """0004 records the blobs existing rows name, so the sweep knows them (and keeps them)."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = alembic_config(url)
    command.upgrade(config, "0003")
    engine = make_engine(url)
    key = "sha256/ab/ab" + "0" * 62
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO tenant (id, name, created_at) VALUES ('t', 't', :now)"),
            {"now": EPOCH},
        )
        for table, kind in (("model", "hf"), ("dataset", "tensors")):
            extra = ", state, summary" if table == "model" else ""
            values = ", 'ready', '{}'" if table == "model" else ""
            connection.execute(
                text(
                    f"INSERT INTO {table} (id, tenant_id, name, format, blob_key, sha256, size,"
                    f" created_at{extra}) VALUES (:id, 't', 'n', :kind, :key, 'x', 7, :now{values})"
                ),
                {"id": table, "kind": kind, "key": key, "now": EPOCH},
            )

    command.upgrade(config, "head")

    with engine.connect() as connection:
        assert connection.execute(text("SELECT key, size FROM blob")).all() == [(key, 7)]
    engine.dispose()
