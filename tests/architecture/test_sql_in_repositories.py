"""Every SQL statement lives in a repository (`repository.py`), the worker's included: other
modules call repository functions and own only the session's life (open, commit, close)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Statement builders; Session, sessionmaker and Engine (types and factories) are not SQL.
BUILDERS = {"select", "update", "insert", "delete", "text", "func", "exists", "and_", "or_"}
# What a session does to the database beyond its own life.
STATEMENTS = {"execute", "scalar", "scalars", "get", "add", "add_all", "delete", "merge", "query"}
# Where SQL belongs besides the repositories: the schema, the engine's own setup, migrations.
ALLOWED = {"service/core/orm.py", "service/core/db.py"}


def sql_in(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
            found += [f"imports {a.name}" for a in node.names if a.name in BUILDERS]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in STATEMENTS
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "session"
        ):
            found.append(f"line {node.lineno}: session.{node.func.attr}(…)")
    return found


def test_no_sql_outside_repositories() -> None:
    offenders = {}
    for package in ("service", "worker"):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if path.name == "repository.py" or relative in ALLOWED or "/migrations/" in relative:
                continue
            if found := sql_in(path):
                offenders[relative] = found
    assert offenders == {}


def test_the_check_finds_sql() -> None:
    sample = ROOT / "service" / "jobs" / "repository.py"
    assert sql_in(sample), "the repository's own SQL is what the check looks for"
