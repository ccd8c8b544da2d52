"""The migrations build the schema the ORM declares: no drift between them (SQLite and Postgres)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from service.db import make_engine
from service.migrate import upgrade
from service.orm import Base


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
