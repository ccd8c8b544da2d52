"""`apoptosis`: run the service (up, api, worker, migrate, keys) and talk to it (models,
datasets, jobs) through the SDK."""

import fcntl
import json
import os
import signal
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, NoReturn, cast

import typer

from service.client import ApiError, Client
from service.jobs.states import JobState
from service.supervisor import WorkerSupervisor

if TYPE_CHECKING:  # the commands import the database layer only when they run
    from sqlalchemy.orm import Session, sessionmaker

    from service.orm import ApiKey

app = typer.Typer(
    help="Apoptosis: Hessian-based model pruning as a service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
models_app = typer.Typer(help="Upload and inspect models.", no_args_is_help=True)
datasets_app = typer.Typer(help="Upload datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Submit, follow and download pruning jobs.", no_args_is_help=True)
for sub, name in (
    (keys_app, "keys"),
    (models_app, "models"),
    (datasets_app, "datasets"),
    (jobs_app, "jobs"),
):
    app.add_typer(sub, name=name)

UrlOption = Annotated[str, typer.Option(envvar="APOPTOSIS_URL", help="API base URL")]
KeyOption = Annotated[str, typer.Option(envvar="APOPTOSIS_API_KEY", help="API key")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _use_home(home: Path | None) -> None:
    if home is not None:
        os.environ["APOPTOSIS_HOME"] = str(home)
    from service.settings import get_settings

    get_settings.cache_clear()


@app.command()
def migrate() -> None:
    """Bring the database schema up to date."""
    from service import migrate as migrations
    from service.settings import get_settings

    migrations.upgrade(get_settings().resolved_database_url())
    typer.echo("database is up to date")


@app.command()
def api(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the HTTP API."""
    import uvicorn

    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
    )


@app.command()
def worker(queues: str = "cpu,gpu", name: str = "worker@%h") -> None:
    """Run one worker process (one per GPU): Celery, solo pool, one job at a time."""
    os.execvp(sys.executable, _worker_command(queues, name))


def _worker_command(queues: str, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
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
    _use_home(home)
    from service import migrate as migrations
    from service.settings import get_settings

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
    from service.auth import create_key, create_tenant, hash_key
    from service.db import get_sessionmaker
    from service.settings import get_settings
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

    from service import migrate as migrations
    from service.db import get_sessionmaker
    from service.settings import get_settings

    url = get_settings().resolved_database_url()
    try:
        migrations.upgrade(url)
    except OperationalError as error:
        _fail(f"cannot open the database at {url}: {str(error.orig).splitlines()[0]}")
    return get_sessionmaker()


@keys_app.command("create")
def create_key(tenant: Annotated[str, typer.Option(help="name of the new tenant")]) -> None:
    """Create a tenant and print its API key (shown once)."""
    from service.auth import create_tenant

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
    from service.auth import create_key
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


def _client(url: str, key: str) -> Client:
    if not key:
        raise typer.BadParameter("set --api-key or APOPTOSIS_API_KEY")
    return Client(url, key)


def _print(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


@models_app.command("upload")
def upload_model(
    path: Path,
    format: str = "hf",
    name: str | None = None,
    wait: bool = True,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "",
) -> None:
    """Upload a model archive; with --wait, until it is validated."""
    with _client(url, api_key) as client:
        model = client.upload_model(path, format, name)
        if wait:
            model = client.wait_for_model(model.id)
        _print(model.model_dump(mode="json"))


@datasets_app.command("upload")
def upload_dataset(
    path: Path,
    format: str = "tensors",
    name: str | None = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "",
) -> None:
    """Upload a dataset file."""
    with _client(url, api_key) as client:
        _print(client.upload_dataset(path, format, name).model_dump(mode="json"))


GranularityOption = Annotated[str, typer.Option(help="channel | layer | unstructured | 2:4")]
HiddenSizeOption = Annotated[
    bool | None,
    typer.Option(help="prune a transformer's hidden size (default: where its config states it)"),
]
DepthShareOption = Annotated[
    float, typer.Option(help="channel: share of the reduction taken by whole blocks first")
]


@jobs_app.command("submit")
def submit(
    model: str,
    dataset: str,
    method: str = "oba",
    granularity: GranularityOption = "channel",
    hidden_size: HiddenSizeOption = None,
    depth_share: DepthShareOption = 0.0,
    target: Annotated[str, typer.Option(help="macs=0.5 | params=0.5 | sparsity=0.5")] = "macs=0.5",
    steps: int = 10,
    loss: str = "cross_entropy",
    batches: int = 8,
    batch_size: int = 32,
    output: list[str] | None = None,
    idempotency_key: str | None = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "",
) -> None:
    """Submit a pruning job and print it."""
    metric, _, value = target.partition("=")
    spec = {
        "model_id": model,
        "dataset_id": dataset,
        "method": method,
        "granularity": granularity,
        "hidden_size": hidden_size,
        "depth_share": depth_share,
        "target": {metric: float(value)},
        "schedule": {"steps": steps},
        "loss": loss,
        "calibration": {"batches": batches, "batch_size": batch_size},
        "outputs": output or ["hf"],
    }
    with _client(url, api_key) as client:
        _print(client.submit_job(spec, idempotency_key).model_dump(mode="json"))


@jobs_app.command("watch")
def watch(job_id: str, url: UrlOption = DEFAULT_URL, api_key: KeyOption = "") -> None:
    """Follow a job with a progress bar until it ends."""
    from rich.progress import Progress

    with _client(url, api_key) as client, Progress() as progress:
        bar = progress.add_task(f"job {job_id}", total=100)
        for kind, data in client.events(job_id):
            if kind == "progress":
                stage = data.get("stage", "")
                progress.update(bar, completed=data.get("percent", 0), description=stage)
            elif kind == "state":
                progress.console.print(f"state: {data['state']}")
        job = client.job(job_id)
    _print(job.model_dump(mode="json", include={"id", "state", "result", "error"}))
    if job.state != JobState.SUCCEEDED:
        raise typer.Exit(1)


@jobs_app.command("download")
def download(
    job_id: str, output: Path = Path("."), url: UrlOption = DEFAULT_URL, api_key: KeyOption = ""
) -> None:
    """Download every artifact of a job into OUTPUT."""
    with _client(url, api_key) as client:
        for artifact in client.artifacts(job_id):
            typer.echo(client.download(artifact, output))


@app.command()
def prune(
    model: Annotated[Path, typer.Argument(help="model folder or archive")],
    data: Annotated[Path, typer.Option(help="calibration data file")],
    output: Annotated[Path, typer.Option(help="where the pruned model goes")] = Path("pruned"),
    format: Annotated[str, typer.Option(help="model format: hf | torch_pickle")] = "hf",
    data_format: Annotated[str, typer.Option(help="tensors | jsonl | imagefolder")] = "tensors",
    target: Annotated[str, typer.Option(help="macs=0.5 | params=0.5 | sparsity=0.5")] = "macs=0.5",
    method: str = "oba",
    granularity: GranularityOption = "channel",
    hidden_size: HiddenSizeOption = None,
    depth_share: DepthShareOption = 0.0,
    steps: int = 10,
    loss: str = "cross_entropy",
    batches: int = 8,
    batch_size: int = 32,
    outputs: Annotated[str, typer.Option(help="comma-separated output formats")] = "hf",
    finetune_epochs: int = 0,
    device: str = "auto",
    trusted: Annotated[bool, typer.Option(help="allow pickled models (runs their code)")] = False,
) -> None:
    """Prune a model on this machine, without a server: the job's steps in-process."""
    prune_local = _local_pruner()
    metric, _, value = target.partition("=")
    spec = {
        "method": method,
        "granularity": granularity,
        "hidden_size": hidden_size,
        "depth_share": depth_share,
        "target": {metric: float(value)},
        "schedule": {"steps": steps},
        "loss": loss,
        "calibration": {"batches": batches, "batch_size": batch_size},
        "outputs": outputs.split(","),
        "finetune": {"epochs": finetune_epochs} if finetune_epochs else None,
    }
    prune_local(model, format, data, data_format, spec, output, trusted=trusted, device=device)


def _local_pruner() -> Callable[..., None]:
    """The job's steps in-process (worker.local), found through the `apoptosis.local` entry point
    (pyproject.toml): the service never imports worker code, and `import service.cli` stays free
    of torch (import-linter and a test check both)."""
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
    try:
        app()
    except ApiError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
