"""How the CLI talks: machine output (`--json`) on stdout, people's output and progress on
stderr or as tables, and every user error as one line that says what to do (`--debug` shows
the traceback instead)."""

import json
import shutil
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NoReturn

import httpx
import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from service.client import ApiError, JobFailed, UnknownFormat
from service.core.errors import CodedError
from service.jobs.results import JobResult
from service.jobs.schemas import Target
from service.jobs.summary import print_candidates, reached, result_table

# Errors a user can act on: each becomes one line on stderr and exit status 2 (1 for a job
# that ended other than succeeded).
USER_ERRORS = (ApiError, JobFailed, UnknownFormat, CodedError, httpx.TransportError, OSError)
stderr = Console(stderr=True)


def emit(value: BaseModel | Sequence[BaseModel] | dict[str, Any], as_json: bool) -> None:
    """One resource (or a list of them): JSON on stdout, or `key: value` lines for people."""
    data = _plain(value)
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    for row in data if isinstance(data, list) else [data]:
        for key, item in row.items():
            shown = json.dumps(item, default=str) if isinstance(item, (dict, list)) else item
            typer.echo(f"{key}: {shown}")
        typer.echo("")


def show_job(job: BaseModel | dict[str, Any], as_json: bool) -> None:
    """A job (or its report) for people: state, target and times, then what it reached with
    the before / after table `apoptosis prune` prints, or its error in one line. `--json`:
    the resource as the API gives it."""
    data = _plain(job)
    if as_json:
        emit(data, as_json)
        return
    spec = data.get("spec") or {}
    attempt = data.get("attempt") or 1
    lines = [
        f"job {data.get('id') or data.get('job_id')}: {data['state']}"
        + (f" (attempt {attempt})" if attempt > 1 else "")
    ]
    if data.get("model_id"):
        lines.append(f"model {data['model_id']}, dataset {data.get('dataset_id') or '—'}")
    if spec.get("target"):
        lines.append(f"target {_target_words(spec)}")
    lines += _times(data)
    error = data.get("error")
    if error:
        lines.append(f"error {error['code']}: {error['message']}")
    out = Console(width=shutil.get_terminal_size((160, 24)).columns)
    for line in lines:
        out.print(line, soft_wrap=True, markup=False, highlight=False)
    if data.get("result") and spec.get("target"):
        result = JobResult.model_validate(data["result"])
        line = reached(result, Target.model_validate(spec["target"]))
        out.print(line, soft_wrap=True, markup=False, highlight=False)
        out.print(result_table(result))
        print_candidates(out, result)


def _target_words(spec: dict[str, Any]) -> str:
    """`macs 0.5`, a family's `macs 0.7 → 0.4`, or `latency_ms 20 at batch 8`."""
    targets = [Target.model_validate(t) for t in spec.get("targets") or [spec["target"]]]
    words = " → ".join(f"{t.value:g}" for t in targets)
    batch = targets[-1].batch
    return f"{targets[-1].metric} {words}" + (f" at batch {batch}" if batch > 1 else "")


def _times(data: dict[str, Any]) -> list[str]:
    """When the job was created, started and finished, in this machine's time, with how long
    it waited and ran."""
    stamps = {k: data.get(f"{k}_at") for k in ("created", "started", "finished")}
    when = {k: datetime.fromisoformat(v).astimezone() for k, v in stamps.items() if v}
    if "created" not in when:
        return []
    words = [f"created {when['created']:%Y-%m-%d %H:%M:%S %Z}"]
    if "started" in when:
        waited = (when["started"] - when["created"]).total_seconds()
        words.append(f"started {_duration(waited)} later")
    if "started" in when and "finished" in when:
        ran = (when["finished"] - when["started"]).total_seconds()
        words.append(f"ran {_duration(ran)}")
    return [", ".join(words)]


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"


def table(
    rows: Iterable[BaseModel], columns: Sequence[str], as_json: bool, more: str | None
) -> None:
    """A listing: a table for people, or `{"items": [...], "next_cursor": ...}` as JSON."""
    items = [row.model_dump(mode="json") for row in rows]
    if as_json:
        typer.echo(json.dumps({"items": items, "next_cursor": more}, indent=2))
        return
    view = Table(box=None)
    for column in columns:  # ids whole: people copy them into the next command
        view.add_column(
            column, no_wrap=column.endswith("id"), min_width=32 if column == "id" else None
        )
    for item in items:
        view.add_row(*(_cell(item.get(column)) for column in columns))
    # A pipe has no width: wide enough that ids and timestamps stay whole.
    Console(width=shutil.get_terminal_size((160, 24)).columns).print(view)
    if more:
        stderr.print(f"more: --cursor {more}")


def fail(message: str, status: int = 2) -> NoReturn:
    """One line on stderr (never wrapped), then exit with `status`."""
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(status)


def explain(error: BaseException, url: str | None = None) -> tuple[str, int]:
    """The one line and the exit status for a user error."""
    if isinstance(error, JobFailed):
        return str(error), 1
    if isinstance(error, ApiError):
        return f"{error.code}: {error.detail or error.status}", 2
    if isinstance(error, httpx.TransportError):
        where = f" at {url}" if url else ""
        return f"cannot reach the API{where} ({error}); is it running (apoptosis up)?", 2
    if isinstance(error, CodedError):
        return f"{error.code}: {error}", 2
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}", 2
    return str(error), 2


def run_safely(app: typer.Typer, debug: bool) -> None:
    """Run the CLI; a user error is one line on stderr (or its traceback with `--debug`).
    Usage errors are Typer's own: the usage, then the error (exit status 2)."""
    try:
        app(standalone_mode=True)
    except USER_ERRORS as error:
        if debug:
            raise
        message, code = explain(error)
        fail(message, code)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    return "--debug" in (sys.argv if argv is None else argv)


def _plain(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return value
    return [item.model_dump(mode="json") for item in value]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str) and len(value) > 20 and value[10:11] == "T":  # a timestamp
        return value[:19] + "Z"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
