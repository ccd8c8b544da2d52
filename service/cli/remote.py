"""`apoptosis models|datasets|jobs …`: the HTTP API from the command line, through the SDK.
Every resource has list, show and delete; every job-spec field has an option (or `--spec`);
every command has `--json`."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.progress import Progress

from service.cli.output import emit, fail, show_job, stderr, table
from service.cli.spec import SpecOptions, build_spec, with_spec_options
from service.client import Client, JobFailed
from service.jobs.schemas import JobOut
from service.jobs.states import JobState

models_app = typer.Typer(help="Upload, list, show and delete models.", no_args_is_help=True)
datasets_app = typer.Typer(help="Upload, list, show and delete datasets.", no_args_is_help=True)
jobs_app = typer.Typer(
    help="Submit, follow, cancel, download and delete pruning jobs.", no_args_is_help=True
)
webhooks_app = typer.Typer(help="The secret that signs job notifications.", no_args_is_help=True)

DEFAULT_URL = "http://127.0.0.1:8000"
CLI_RETRIES = 2  # a person at a prompt learns of an API that is down in seconds, not 15
UrlOption = Annotated[str, typer.Option(envvar="APOPTOSIS_URL", help="API base URL")]
KeyOption = Annotated[str, typer.Option(envvar="APOPTOSIS_API_KEY", help="API key")]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON on stdout, for scripts")]
LimitOption = Annotated[int, typer.Option(help="rows per page (1 to 200)")]
CursorOption = Annotated[str | None, typer.Option(help="the next page (printed after a page)")]
ExistingFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)]


def client(url: str, key: str) -> Client:
    if not key:
        fail("no API key: pass --api-key or set APOPTOSIS_API_KEY (apoptosis up prints one)")
    return Client(url, key, retries=CLI_RETRIES)


# --- what every resource has: list (models, datasets), show, delete --------------------------

Reader = Callable[[Client, str], BaseModel]
Pager = Callable[[Client, int, str | None], Any]


def add_show_and_delete(
    app: typer.Typer,
    noun: str,
    read: Reader,
    delete: Callable[[Client, str], None],
    show_help: str,
    delete_help: str,
    render: Callable[[Any, bool], None] = emit,
) -> None:
    """`show ID` and `delete ID` for one kind of resource (shown by `render`)."""

    @app.command("show", help=show_help)
    def show(
        resource_id: Annotated[str, typer.Argument(metavar=f"{noun.upper()}_ID")],
        as_json: JsonOption = False,
        url: UrlOption = DEFAULT_URL,
        api_key: KeyOption = "",
    ) -> None:
        with client(url, api_key) as api:
            render(read(api, resource_id), as_json)

    @app.command("delete", help=delete_help)
    def delete_(
        resource_id: Annotated[str, typer.Argument(metavar=f"{noun.upper()}_ID")],
        as_json: JsonOption = False,
        url: UrlOption = DEFAULT_URL,
        api_key: KeyOption = "",
    ) -> None:
        with client(url, api_key) as api:
            delete(api, resource_id)
        emit({"deleted": resource_id}, as_json)


def add_list(app: typer.Typer, noun: str, pages: Pager, columns: tuple[str, ...]) -> None:
    """`list` of one kind of resource: newest first, a page at a time."""

    @app.command("list", help=f"The tenant's {noun}s, newest first.")
    def list_(
        limit: LimitOption = 50,
        cursor: CursorOption = None,
        as_json: JsonOption = False,
        url: UrlOption = DEFAULT_URL,
        api_key: KeyOption = "",
    ) -> None:
        with client(url, api_key) as api:
            page = pages(api, limit, cursor)
        table(page.items, columns, as_json, page.next_cursor)


add_list(
    models_app, "model", Client.models, ("id", "name", "format", "state", "size", "created_at")
)
add_show_and_delete(
    models_app,
    "model",
    Client.model,
    Client.delete_model,
    "One model, with its summary (parameters, MACs, layers).",
    "Delete a model no job uses (delete those jobs first).",
)
add_list(datasets_app, "dataset", Client.datasets, ("id", "name", "format", "size", "created_at"))
add_show_and_delete(
    datasets_app,
    "dataset",
    Client.dataset,
    Client.delete_dataset,
    "One dataset.",
    "Delete a dataset no job uses (delete those jobs first).",
)
add_show_and_delete(
    jobs_app,
    "job",
    Client.job,
    Client.delete_job,
    "One job: its state, target and times, then its result as a before / after table, or its "
    "error (--json: the whole resource).",
    "Delete an ended job with its artifacts.",
    show_job,
)


# --- models -------------------------------------------------------------------------------------


@models_app.command("upload")
def upload_model(
    path: ExistingFile,
    format: Annotated[
        str | None, typer.Option(help="hf | torch_pickle (default: from the file)")
    ] = None,
    name: str | None = None,
    wait: Annotated[bool, typer.Option(help="until the model is validated")] = True,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "",
) -> None:
    """Upload a model (a zipped Hugging Face folder, or a pickle in trusted mode)."""
    with client(url, api_key) as api:
        model = api.upload_model(path, format, name)
        if wait:
            model = api.wait_for_model(model.id)
    emit(model, as_json)
    if model.state == "rejected":
        fail(f"{path.name} was rejected: {model.rejection_reason}")


# --- datasets -----------------------------------------------------------------------------------


@datasets_app.command("upload")
def upload_dataset(
    path: ExistingFile,
    format: Annotated[
        str | None, typer.Option(help="tensors | jsonl | imagefolder (default: from the file)")
    ] = None,
    name: str | None = None,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "",
) -> None:
    """Upload calibration data (.safetensors or .npz, .jsonl texts, a zip of image folders)."""
    with client(url, api_key) as api:
        emit(api.upload_dataset(path, format, name), as_json)


# --- job specs ----------------------------------------------------------------------------------

Opt = typer.Option
EvalDataset = Annotated[str | None, Opt("--eval-dataset", help="evaluate on this dataset")]
NotifyUrl = Annotated[str | None, Opt(help="POST signed notifications of state changes here")]


# --- jobs ---------------------------------------------------------------------------------------


@jobs_app.command("submit")
@with_spec_options
def submit(
    model: Annotated[str, typer.Argument(help="model id")],
    dataset: Annotated[str, typer.Argument(help="dataset id")],
    options: SpecOptions,
    eval_dataset: EvalDataset = None,
    notify_url: NotifyUrl = None,
    idempotency_key: str | None = None,
    wait: Annotated[bool, typer.Option(help="follow the job until it ends")] = False,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "",
) -> None:
    """Submit a pruning job; with --wait, follow it and exit 1 if it does not succeed."""
    base = {"model_id": model, "dataset_id": dataset}
    spec = build_spec(base, options, eval_dataset=eval_dataset, notify_url=notify_url)
    with client(url, api_key) as api:
        job = api.submit_job(spec, idempotency_key)
        if wait:
            job = follow(api, job.id)
    show_job(job, as_json)
    ended(job)


@jobs_app.command("list")
def list_jobs(
    state: Annotated[str | None, typer.Option(help="queued | running | succeeded | …")] = None,
    limit: LimitOption = 50,
    cursor: CursorOption = None,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "",
) -> None:
    """The tenant's jobs, newest first."""
    with client(url, api_key) as api:
        page = api.jobs_page(state, limit, cursor)
    table(
        page.items, ("id", "state", "model_id", "attempt", "created_at"), as_json, page.next_cursor
    )


@jobs_app.command("watch")
def watch(
    job_id: str, as_json: JsonOption = False, url: UrlOption = DEFAULT_URL, api_key: KeyOption = ""
) -> None:
    """Follow a job with a progress bar (on stderr) until it ends; exit 1 unless it succeeded."""
    with client(url, api_key) as api:
        job = follow(api, job_id)
    if as_json:
        emit(job.model_dump(mode="json", include={"id", "state", "result", "error"}), as_json)
    else:
        show_job(job, as_json)
    ended(job)


@jobs_app.command("events")
def events(
    job_id: str, as_json: JsonOption = False, url: UrlOption = DEFAULT_URL, api_key: KeyOption = ""
) -> None:
    """The job's event log (states, progress, log lines) until it ends; JSON lines with --json."""
    with client(url, api_key) as api:
        for kind, data in api.events(job_id):
            if as_json:
                typer.echo(json.dumps({"event": kind, "data": data}))
            else:
                typer.echo(f"{kind}: {json.dumps(data)}")


jobs_app.command("logs", help="The job's event log (the same as `events`).")(events)


@jobs_app.command("cancel")
def cancel(
    job_id: str, as_json: JsonOption = False, url: UrlOption = DEFAULT_URL, api_key: KeyOption = ""
) -> None:
    """Cancel a queued or running job (a running one stops at its next step)."""
    with client(url, api_key) as api:
        emit(api.cancel(job_id), as_json)


@jobs_app.command("report")
def report(
    job_id: str, as_json: JsonOption = False, url: UrlOption = DEFAULT_URL, api_key: KeyOption = ""
) -> None:
    """The job's metrics before and after pruning (and fine-tuning), as a table."""
    with client(url, api_key) as api:
        show_job(api.report(job_id), as_json)


@jobs_app.command("download")
def download(
    job_id: str,
    output: Annotated[Path, typer.Option(help="folder for the artifacts")] = Path("."),
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "",
) -> None:
    """Download every artifact of a job into OUTPUT."""
    with client(url, api_key) as api:
        files = [api.download(artifact, output) for artifact in api.artifacts(job_id)]
    if as_json:
        typer.echo(json.dumps([str(f) for f in files]))
    else:
        for file in files:
            typer.echo(file)


@jobs_app.command("deliveries")
def deliveries(
    job_id: str, as_json: JsonOption = False, url: UrlOption = DEFAULT_URL, api_key: KeyOption = ""
) -> None:
    """The job's webhook notifications and how each went."""
    with client(url, api_key) as api:
        rows = api.deliveries(job_id)
    table(rows, ("id", "event_type", "state", "attempts", "last_status"), as_json, None)


@webhooks_app.command("secret")
def webhook_secret(
    rotate: Annotated[bool, typer.Option(help="make a new one; the old one stops at once")] = False,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "",
) -> None:
    """Print the secret that signs this tenant's notifications (Standard Webhooks)."""
    with client(url, api_key) as api:
        secret = api.webhook_secret(rotate=rotate)
    typer.echo(json.dumps({"secret": secret}) if as_json else secret)


def follow(api: Client, job_id: str) -> JobOut:
    """Follow the job's events with a progress bar on stderr; the job once it has ended."""
    with Progress(console=stderr, transient=True) as progress:
        bar = progress.add_task(f"job {job_id}", total=100)
        for kind, data in api.events(job_id):
            if kind == "progress":
                progress.update(
                    bar, completed=data.get("percent", 0), description=data.get("stage", "")
                )
            elif kind == "state":
                progress.console.print(f"state: {data['state']}")
    return api.wait(job_id)


def ended(job: JobOut) -> None:
    """Exit 1 with the job's error code when a job followed to its end did not succeed."""
    if job.state in (JobState.FAILED, JobState.CANCELLED):
        raise JobFailed(job)
