"""`apoptosis keys`: list, revoke and rotate act at once; the embedded key survives a revocation."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.api.app import create_app
from service.cli import main as cli
from service.cli.migrate import upgrade
from service.core import db as service_db
from service.core.settings import get_settings


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh embedded home (its own SQLite database), as `apoptosis up` would use."""
    monkeypatch.setenv("APOPTOSIS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("APOPTOSIS_DATABASE_URL", raising=False)
    monkeypatch.delenv("APOPTOSIS_API_KEY", raising=False)
    for cached in (get_settings, service_db.get_engine, service_db.get_sessionmaker):
        cached.cache_clear()
    upgrade(get_settings().resolved_database_url())
    yield tmp_path / "home"
    service_db.get_engine().dispose()
    for cached in (get_settings, service_db.get_engine, service_db.get_sessionmaker):
        cached.cache_clear()


def keys(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.app, ["keys", *args])
    return result.exit_code, result.stdout, result.stderr


def answers(key: str) -> int:
    with TestClient(create_app()) as client:
        return client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def test_a_key_is_listed_revoked_and_refused_at_once(home: Path) -> None:
    code, key, _ = keys("create", "--tenant", "acme")
    key = key.strip()
    assert code == 0 and answers(key) == 200

    code, listing, _ = keys("list", "--json")
    [row] = [json.loads(line) for line in listing.splitlines()]
    assert (row["tenant"], row["state"]) == ("acme", "active")
    assert key.startswith(row["prefix"]) and key not in listing  # only the prefix is shown

    assert keys("revoke", row["prefix"])[0] == 0
    assert answers(key) == 401
    assert json.loads(keys("list", "--json")[1])["state"] == "revoked"


def test_rotation_gives_the_same_tenant_a_new_key_and_ends_the_old(home: Path) -> None:
    old = keys("create", "--tenant", "acme")[1].strip()
    prefix = json.loads(keys("list", "--json")[1])["prefix"]

    code, new, _ = keys("rotate", prefix)
    new = new.strip()

    assert code == 0 and new != old
    assert (answers(old), answers(new)) == (401, 200)
    tenants = {json.loads(line)["tenant_id"] for line in keys("list", "--json")[1].splitlines()}
    assert len(tenants) == 1


def test_an_unknown_prefix_is_one_line_and_exit_2(home: Path) -> None:
    code, _, error = keys("revoke", "apo_nope")
    assert code == 2
    assert error.strip().startswith("error:") and len(error.strip().splitlines()) == 1


def test_the_embedded_key_file_survives_its_revocation(home: Path) -> None:
    first = cli._local_key()
    prefix = json.loads(keys("list", "--json")[1])["prefix"]
    keys("revoke", prefix)

    second = cli._local_key()  # what `apoptosis up` does when it starts again

    assert second != first and answers(second) == 200
    assert (home / "api-key").read_text().strip() == second


def test_a_revoked_apoptosis_api_key_stops_up_with_one_line(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = keys("create", "--tenant", "ops")[1].strip()
    keys("revoke", json.loads(keys("list", "--json")[1])["prefix"])
    monkeypatch.setenv("APOPTOSIS_API_KEY", key)
    get_settings.cache_clear()

    with pytest.raises(cli.typer.Exit) as stopped:
        cli._local_key()

    assert stopped.value.exit_code == 2
    assert "APOPTOSIS_API_KEY is revoked" in capsys.readouterr().err


def test_keys_work_on_a_home_nothing_has_migrated_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APOPTOSIS_HOME", str(tmp_path / "new"))
    monkeypatch.delenv("APOPTOSIS_DATABASE_URL", raising=False)
    for cached in (get_settings, service_db.get_engine, service_db.get_sessionmaker):
        cached.cache_clear()
    try:
        code, key, error = keys("create", "--tenant", "first")
        assert (code, error) == (0, "") and key.startswith("apo_")
        assert json.loads(keys("list", "--json")[1])["tenant"] == "first"
    finally:
        service_db.get_engine().dispose()
        for cached in (get_settings, service_db.get_engine, service_db.get_sessionmaker):
            cached.cache_clear()
