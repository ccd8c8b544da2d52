"""`apoptosis models|datasets|jobs …`: the HTTP API from the command line, through the SDK.
Every resource has list, show and delete; every job-spec field has an option (or `--spec`);
every command has `--json`."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ByteSize, TypeAdapter, ValidationError
from rich.progress import Progress

from service.cli_output import emit, fail, show_job, stderr, table
from service.client import Client, JobFailed
from service.jobs.schemas import JobOut, JobSpec
from service.jobs.states import JobState
from service.jobs.vocabulary import allocations, methods

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
SpecFile = Annotated[
    Path | None,
    Opt("--spec", exists=True, dir_okay=False, help="a JSON job spec; options override its fields"),
]
Method = Annotated[str | None, Opt(help=" | ".join(methods()))]
Granularity = Annotated[str | None, Opt(help="channel | layer | unstructured | 2:4")]
HiddenSize = Annotated[
    bool | None, Opt(help="prune a transformer's hidden size (default: where its config says)")
]
DepthShare = Annotated[
    float | None, Opt(help="channel: share of the reduction taken by whole blocks first")
]
Normalisation = Annotated[
    str | None,
    Opt(
        help=" | ".join(allocations())
        + ": how removal is spread over layers (max, the default; lamp spreads it more evenly, "
        "for fine-tuning)"
    ),
]
TargetOpt = Annotated[
    str | None, Opt(help="macs=0.5 | params=0.5 | sparsity=0.5 | latency_ms=5,batch=32")
]
TargetsOpt = Annotated[
    str | None, Opt(help="a family from one run: macs=0.75,0.5,0.3 (one model set each)")
]
Steps = Annotated[int | None, Opt(help="pruning steps")]
ScheduleKind = Annotated[str | None, Opt(help="exponential | linear")]
Loss = Annotated[str | None, Opt(help="cross_entropy | mse | distill | causal_lm")]
Batches = Annotated[int | None, Opt(help="calibration batches per step")]
BatchSize = Annotated[int | None, Opt(help="calibration rows per batch")]
MaxMemory = Annotated[
    str | None,
    Opt(
        metavar="SIZE",
        help="memory one scoring pass may use: 512MiB, 2GiB (2GB is 2·10⁹) or bytes; larger "
        "batches go in micro-batches",
    ),
]
Epochs = Annotated[int | None, Opt("--finetune-epochs", help="fine-tune after pruning")]
LearningRate = Annotated[float | None, Opt("--finetune-lr", help="fine-tuning learning rate")]
EvalFraction = Annotated[
    float | None, Opt("--eval-fraction", help="evaluate on this last fraction of the rows")
]
EvalDataset = Annotated[str | None, Opt("--eval-dataset", help="evaluate on this dataset")]
ImageSize = Annotated[int | None, Opt("--image-size", help="images: resize to this side")]
Mean = Annotated[str | None, Opt(help="images: per-channel mean, comma-separated")]
Std = Annotated[str | None, Opt(help="images: per-channel std, comma-separated")]
Outputs = Annotated[str | None, Opt(help="comma-separated: hf,safetensors,onnx,pt2,torch_pickle")]
NotifyUrl = Annotated[str | None, Opt(help="POST signed notifications of state changes here")]


def build_spec(
    base: dict[str, Any],
    spec_file: Path | None,
    *,
    method: str | None = None,
    granularity: str | None = None,
    hidden_size: bool | None = None,
    depth_share: float | None = None,
    normalisation: str | None = None,
    target: str | None = None,
    targets: str | None = None,
    steps: int | None = None,
    schedule_kind: str | None = None,
    loss: str | None = None,
    batches: int | None = None,
    batch_size: int | None = None,
    max_memory: str | int | None = None,
    finetune_epochs: int | None = None,
    finetune_lr: float | None = None,
    eval_fraction: float | None = None,
    eval_dataset: str | None = None,
    image_size: int | None = None,
    mean: str | None = None,
    std: str | None = None,
    outputs: str | None = None,
    notify_url: str | None = None,
) -> dict[str, Any]:
    """A job spec from `--spec` (if any) and the options given, checked as the API checks it."""
    spec: dict[str, Any] = json.loads(spec_file.read_text()) if spec_file else {}
    spec |= base
    flat = {
        "method": method,
        "granularity": granularity,
        "hidden_size": hidden_size,
        "depth_share": depth_share,
        "normalisation": normalisation,
        "loss": loss,
        "notify_url": notify_url,
        "outputs": outputs.split(",") if outputs else None,
    }
    spec |= {key: value for key, value in flat.items() if value is not None}
    if target:
        spec["target"] = _target(target)
    if targets:
        metric, _, values = targets.partition("=")
        example = "macs=0.75,0.5,0.3"
        spec["targets"] = [{metric: _number(v, "--targets", example)} for v in values.split(",")]
        spec.pop("target", None)  # the last of the family
    _merge(spec, "schedule", steps=steps, kind=schedule_kind)
    memory = None if max_memory is None else _size(max_memory, "--max-memory")
    _merge(spec, "calibration", batches=batches, batch_size=batch_size, max_memory=memory)
    _merge(spec, "finetune", epochs=finetune_epochs, lr=finetune_lr)
    _merge(spec, "evaluation", fraction=eval_fraction, dataset_id=eval_dataset)
    _merge(
        spec, "preprocess", size=image_size, mean=_floats(mean, "--mean"), std=_floats(std, "--std")
    )
    try:
        JobSpec.model_validate(spec)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "spec"
        fail(f"invalid job spec: {where}: {problem['msg']}")
    return spec


def _target(text: str) -> dict[str, float | int]:
    """`macs=0.5`, or a latency and the rows it is timed at: `latency_ms=5,batch=32`."""
    example = "macs=0.5 or latency_ms=5,batch=32"
    target: dict[str, float | int] = {}
    for part in text.split(","):
        key, equals, value = (piece.strip() for piece in part.partition("="))
        if not equals or not key:
            fail(
                f"--target wants name=value, as in {example}; got {text!r} (several "
                "targets, a family: --targets macs=0.75,0.5,0.3)"
            )
        if key in target:
            fail(f"--target names {key} twice; got {text!r}")
        number = _number(value, "--target", example)
        target[key] = int(number) if key == "batch" and number.is_integer() else number
    return target


def _merge(spec: dict[str, Any], part: str, **values: Any) -> None:
    given = {key: value for key, value in values.items() if value is not None}
    if given:
        spec[part] = (spec.get(part) or {}) | given


def _number(text: str, option: str, example: str) -> float:
    try:
        return float(text)
    except ValueError:
        fail(f"{option} wants a number, as in {example}; got {text!r}")


def _size(text: str | int, option: str) -> int:
    """Bytes from 2GiB, 512MB, 1.5 GiB or a plain count (pydantic's ByteSize reads them)."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        fail(f"{option} wants a size, as in 512MiB or 2GiB; got {text!r}")


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    return [_number(part, option, "0.5,0.5,0.5") for part in text.split(",")]


# --- jobs ---------------------------------------------------------------------------------------


@jobs_app.command("submit")
def submit(
    model: Annotated[str, typer.Argument(help="model id")],
    dataset: Annotated[str, typer.Argument(help="dataset id")],
    spec_file: SpecFile = None,
    method: Method = None,
    granularity: Granularity = None,
    hidden_size: HiddenSize = None,
    depth_share: DepthShare = None,
    normalisation: Normalisation = None,
    target: TargetOpt = None,
    targets: TargetsOpt = None,
    steps: Steps = None,
    schedule_kind: ScheduleKind = None,
    loss: Loss = None,
    batches: Batches = None,
    batch_size: BatchSize = None,
    max_memory: MaxMemory = None,
    finetune_epochs: Epochs = None,
    finetune_lr: LearningRate = None,
    eval_fraction: EvalFraction = None,
    eval_dataset: EvalDataset = None,
    image_size: ImageSize = None,
    mean: Mean = None,
    std: Std = None,
    outputs: Outputs = None,
    notify_url: NotifyUrl = None,
    idempotency_key: str | None = None,
    wait: Annotated[bool, typer.Option(help="follow the job until it ends")] = False,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "",
) -> None:
    """Submit a pruning job; with --wait, follow it and exit 1 if it does not succeed."""
    spec = build_spec(
        {"model_id": model, "dataset_id": dataset},
        spec_file,
        method=method,
        granularity=granularity,
        hidden_size=hidden_size,
        depth_share=depth_share,
        normalisation=normalisation,
        target=target,
        targets=targets,
        steps=steps,
        schedule_kind=schedule_kind,
        loss=loss,
        batches=batches,
        batch_size=batch_size,
        max_memory=max_memory,
        finetune_epochs=finetune_epochs,
        finetune_lr=finetune_lr,
        eval_fraction=eval_fraction,
        eval_dataset=eval_dataset,
        image_size=image_size,
        mean=mean,
        std=std,
        outputs=outputs,
        notify_url=notify_url,
    )
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
