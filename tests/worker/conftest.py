"""Worker test fixtures: a tenant in a migrated SQLite database under the test's folder, with
the settings, engine and store caches cleared around it."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.cli import migrate
from service.core.db import get_engine, get_sessionmaker
from service.core.settings import get_settings
from service.core.store import get_store
from service.tenants.auth import create_tenant


@pytest.fixture
def tenant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("APOPTOSIS_HOME", str(tmp_path / "home"))
    for cached in (get_settings, get_engine, get_sessionmaker, get_store):
        cached.cache_clear()
    migrate.upgrade(get_settings().resolved_database_url())
    with get_sessionmaker()() as session:
        created, _ = create_tenant(session, "t")
        session.commit()
    yield created.id
    get_engine().dispose()
    for cached in (get_settings, get_engine, get_sessionmaker, get_store):
        cached.cache_clear()
