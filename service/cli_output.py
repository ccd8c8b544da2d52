"""How the CLI talks: machine output (`--json`) on stdout, people's output and progress on
stderr or as tables, and every user error as one line that says what to do (`--debug` shows
the traceback instead)."""

import json
import shutil
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import httpx
import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from service.client import ApiError, JobFailed
from service.errors import CodedError
from service.formats import UnknownFormat

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
