"""`apoptosis`: run the service (up, api, worker, migrate, keys), talk to it (models, datasets,
jobs: `cli_api.py`), or prune on this machine without one (prune)."""

import fcntl
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, entry_points, requires, version
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, NoReturn, cast

import typer

from service.cli import remote
from service.cli.output import debug_requested, run_safely
from service.cli.spec import SpecOptions, build_spec, with_spec_options
from service.cli.supervisor import WorkerSupervisor
from service.client import formats

if TYPE_CHECKING:  # the commands import the database layer only when they run
    from sqlalchemy.orm import Session, sessionmaker

    from service.core.orm import ApiKey

app = typer.Typer(
    help="Apoptosis: Hessian-based model pruning as a service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
for sub, name in (
    (keys_app, "keys"),
    (remote.models_app, "models"),
    (remote.datasets_app, "datasets"),
    (remote.jobs_app, "jobs"),
    (remote.webhooks_app, "webhooks"),
):
    app.add_typer(sub, name=name)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="show the traceback of an error, not one line")
    ] = False,
) -> None:
    """Apoptosis: Hessian-based model pruning as a service."""


def _needs(command: str, *extras: str) -> None:
    """`pip install apoptosis` is the SDK and the client commands: a command that runs the
    service says in one line which extras it needs, rather than failing deep in an import."""
    if not all(_installed(extra) for extra in extras):
        _fail(
            f"apoptosis {command} needs the {' and the '.join(extras)}: "
            f"pip install 'apoptosis[{','.join(extras)}]'"
        )


def _installed(extra: str) -> bool:
    """Whether every package the extra lists is installed, read from this install's metadata:
    pyproject.toml's list, not a copy of it."""
    try:
        requirements = requires("apoptosis") or []
    except PackageNotFoundError:  # run from a source tree that was never installed
        return True
    for requirement in requirements:
        if requirement.endswith(f'extra == "{extra}"'):
            try:
                version(re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0])
            except PackageNotFoundError:
                return False
    return True


def _use_home(home: Path | None) -> None:
    if home is not None:
        os.environ["APOPTOSIS_HOME"] = str(home)
    from service.core.settings import get_settings

    get_settings.cache_clear()


@app.command()
def migrate() -> None:
    """Bring the database schema up to date."""
    _needs("migrate", "server")
    from service.cli import migrate as migrations
    from service.core.settings import get_settings

    migrations.upgrade(get_settings().resolved_database_url())
    typer.echo("database is up to date")


@app.command()
def api(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the HTTP API."""
    _needs("api", "server")
    import uvicorn

    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
    )


@app.command()
def worker(queues: str = "cpu,gpu", name: str = "worker@%h") -> None:
    """Run one worker process (one per GPU): Celery, solo pool, one job at a time."""
    _needs("worker", "server", "worker")
    os.execvp(sys.executable, _worker_command(queues, name))


# `python -m celery -A worker.runtime.celery_app` imports `worker` from the current directory
# first (`-m` and Celery's app lookup both put it on sys.path): run from a project with its own
# worker.py, the worker stopped with "'worker' is not a package". `-P` keeps the directory off
# sys.path, and the app, imported before Celery looks for it, is ours.
_CELERY = "import worker.runtime.celery_app; from celery.__main__ import main; main()"


def _worker_command(queues: str, name: str) -> list[str]:
    return [
        sys.executable,
        "-P",
        "-c",
        _CELERY,
        "-A",
        "worker.runtime.celery_app",
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "-Q",
        queues,
        "-n",
        name,
        "--loglevel=INFO",
    ]


@app.command()
def up(
    host: str = "127.0.0.1",
    port: int = 8000,
    home: Annotated[Path, typer.Option(help="where the embedded state lives")] = Path("var"),
) -> None:
    """Embedded service: migrate SQLite under HOME, start one worker and the API."""
    _needs("up", "server", "worker")
    _use_home(home)
    from service.cli import migrate as migrations
    from service.core.settings import get_settings

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.resolved_database_url())
    key = _local_key()
    _home_lock = _hold_home(settings.home)  # held until exit; the OS releases it on any death
    worker = WorkerSupervisor(
        _worker_command("cpu,gpu", "embedded@%h"),
        {**os.environ, "APOPTOSIS_HOME": str(settings.home)},
        settings.home / "worker.pid",
    )
    worker.start()
    typer.echo(f"Apoptosis is running at http://{host}:{port}")
    typer.echo(f"API key: {key}")
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        api(host, port)
    finally:
        worker.stop()


def _hold_home(home: Path) -> IO[bytes]:
    """An exclusive lock on HOME for this `up`: a second one on the same home stops with one
    line instead of running a second worker. The OS releases it when the process dies."""
    lock = (home / "up.lock").open("wb")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _fail(f"another `apoptosis up` is running on {home}; stop it first")
    return lock


def _local_key() -> str:
    """The embedded tenant's key: APOPTOSIS_API_KEY if set, else one kept in HOME/api-key. A
    revoked key file gets a new key for the same tenant; a revoked APOPTOSIS_API_KEY stops."""
    from service.core.db import get_sessionmaker
    from service.core.settings import get_settings
    from service.tenants.auth import create_key, create_tenant, hash_key
    from service.tenants.repository import key_record

    settings = get_settings()
    key_file = settings.home / "api-key"
    wanted = settings.api_key or (key_file.read_text().strip() if key_file.exists() else "")
    with get_sessionmaker()() as session:
        record = key_record(session, hash_key(wanted)) if wanted else None
        if record is not None and record.revoked_at is None:
            return wanted
        if record is not None and settings.api_key:
            _fail("APOPTOSIS_API_KEY is revoked: set a current key, or unset it to get a new one")
        if record is not None:  # the key file's key was revoked: the same tenant, a new key
            key = create_key(session, record.tenant_id)
        else:
            _, key = create_tenant(session, "local", wanted or None)
        session.commit()
    if not settings.api_key:
        key_file.touch(mode=0o600)
        key_file.write_text(key + "\n")
    return key


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2: a user error, never a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _key_store() -> "sessionmaker[Session]":
    """The database the key commands work on, migrated first: they run before `up` or
    `migrate` ever has, and then meet no tables. A database they cannot reach is one line."""
    from sqlalchemy.exc import OperationalError

    from service.cli import migrate as migrations
    from service.core.db import get_sessionmaker
    from service.core.settings import get_settings

    url = get_settings().resolved_database_url()
    try:
        migrations.upgrade(url)
    except OperationalError as error:
        _fail(f"cannot open the database at {url}: {str(error.orig).splitlines()[0]}")
    return get_sessionmaker()


@keys_app.callback()
def _keys() -> None:
    _needs("keys", "server")  # before a command imports the database layer


@keys_app.command("create")
def create_key(tenant: Annotated[str, typer.Option(help="name of the new tenant")]) -> None:
    """Create a tenant and print its API key (shown once)."""
    from service.tenants.auth import create_tenant

    with _key_store()() as session:
        _, key = create_tenant(session, tenant)
        session.commit()
    typer.echo(key)


@keys_app.command("list")
def list_keys(as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False) -> None:
    """Every key: its prefix (what `revoke` and `rotate` take), tenant, creation, state."""
    from service.tenants.repository import keys

    with _key_store()() as session:
        for key, tenant in keys(session):
            state = "active" if key.revoked_at is None else "revoked"
            row = {
                "prefix": key.prefix,
                "tenant": tenant,
                "tenant_id": key.tenant_id,
                "created_at": key.created_at.isoformat(),
                "state": state,
            }
            line = json.dumps(row) if as_json else f"{key.prefix}  {state:7}  {tenant}"
            typer.echo(line)


@keys_app.command("revoke")
def revoke_key(prefix: Annotated[str, typer.Argument(help="the key's prefix (keys list)")]) -> None:
    """Revoke a key at once: the API refuses it from the next request on."""
    from service.tenants.repository import revoke

    with _key_store()() as session:
        key = _one_active_key(session, prefix)
        revoke(session, key)
        session.commit()
    typer.echo(f"revoked {prefix}")


@keys_app.command("rotate")
def rotate_key(prefix: Annotated[str, typer.Argument(help="the key's prefix (keys list)")]) -> None:
    """Print a new key for the same tenant (shown once) and revoke the old one."""
    from service.tenants.auth import create_key
    from service.tenants.repository import revoke

    with _key_store()() as session:
        old = _one_active_key(session, prefix)
        new = create_key(session, old.tenant_id)
        revoke(session, old)
        session.commit()
    typer.echo(new)


def _one_active_key(session: "Session", prefix: str) -> "ApiKey":
    from service.tenants.repository import keys_with_prefix

    active = [k for k in keys_with_prefix(session, prefix) if k.revoked_at is None]
    if not active:
        _fail(f"no active key has the prefix {prefix!r}; see `apoptosis keys list`")
    if len(active) > 1:
        _fail(f"{len(active)} active keys share the prefix {prefix!r}; revoke them by tenant")
    return active[0]


@app.command()
@with_spec_options
def prune(
    model: Annotated[Path, typer.Argument(exists=True, help="model folder or archive")],
    data: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="calibration data")],
    options: SpecOptions,
    output: Annotated[Path, typer.Option(help="where the pruned model goes")] = Path("pruned"),
    format: Annotated[
        str | None, typer.Option(help="hf | torch_pickle (default: from the file)")
    ] = None,
    data_format: Annotated[
        str | None, typer.Option(help="tensors | jsonl | imagefolder (default: from the file)")
    ] = None,
    device: str = "auto",
    trusted: Annotated[bool, typer.Option(help="allow pickled models (runs their code)")] = False,
) -> None:
    """Prune a model on this machine, without a server: the job's steps in-process."""
    model_format = format or ("hf" if model.is_dir() else formats.model_format(model))
    spec = build_spec({"model_id": "local", "dataset_id": "local"}, options)
    prune_local = _local_pruner()
    data_kind = data_format or formats.dataset_format(data)
    prune_local(model, model_format, data, data_kind, spec, output, trusted=trusted, device=device)


def _local_pruner() -> Callable[..., None]:
    """The job's steps in-process (worker.pipeline.local), found through the `apoptosis.local`
    entry point (pyproject.toml): the service never imports worker code, and
    `import service.cli.main` stays free of torch (import-linter and a test check both)."""
    try:
        return cast(Callable[..., None], entry_points(group="apoptosis.local")["prune"].load())
    except ImportError as error:
        typer.echo(
            f"error: local pruning needs the worker's packages ({error.name} is missing); "
            "install apoptosis[worker]",
            err=True,
        )
        raise typer.Exit(2) from error


def main() -> None:
    run_safely(app, debug=debug_requested())
