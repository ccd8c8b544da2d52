"""`apoptosis prune`: the job's steps in-process, for people who want the engine without a
server. Same loading, checks, engine and exports as a worker; a progress bar instead of SSE."""

import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from service.core import archives
from service.core.errors import CodedError
from service.core.settings import get_settings
from service.jobs import results
from service.jobs.schemas import JobSpec
from service.jobs.summary import print_candidates, reached, result_table
from worker.engine import EngineError
from worker.pipeline import precision
from worker.pipeline.export import Exported
from worker.pipeline.steps import JobFiles, execute

USER_ERRORS = (CodedError, EngineError)  # every error with a code the user can act on


def prune_local(
    model: Path,
    model_format: str,
    data: Path,
    data_format: str,
    spec: dict[str, Any],
    output: Path,
    *,
    trusted: bool,
    device: str,
) -> list[Path]:
    """Run one job on local files; returns the written artifacts."""
    checked = JobSpec.model_validate({"model_id": "local", "dataset_id": "local", **spec})
    precision.allow_tf32(get_settings().allow_tf32)
    # One progress bar, the job's: transformers' own (loading weights, writing shards) would
    # print between its updates.
    transformers.utils.logging.disable_progress_bar()
    console = Console()
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        root = _model_root(model, model_format, Path(work), trusted)
        files = JobFiles(root, model_format, data, data_format, None, output)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("loading", total=100)

            def report(update: results.Progress) -> None:
                label = update.stage or ""
                if update.step is not None:
                    label = f"pruning step {update.step}/{update.total}"
                progress.update(bar, completed=update.percent or 0, description=label)

            try:
                result, exports = execute(checked, files, _device(device), trusted, report)
                progress.update(bar, completed=100, description="done")
            except USER_ERRORS as error:  # one line, what to do; never a traceback
                progress.stop()
                # one line whatever the terminal's width; the message's brackets are not markup
                console.print(
                    f"error {error.code}: {error}", style="red", soft_wrap=True, markup=False
                )
                raise SystemExit(2) from error
    # plain lines, never wrapped or cut: what was reached, then the whole path of each file
    console.print(reached(result, checked.target), soft_wrap=True, markup=False, highlight=False)
    console.print(result_table(result))
    print_candidates(console, result)
    for line in _outputs(exports):
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    return [e.path for e in exports]


def _model_root(model: Path, model_format: str, work: Path, trusted: bool) -> Path:
    """A model folder is used as is; an archive is checked and extracted like an upload."""
    if model_format != "hf" or model.is_dir():
        return model
    archives.check_hf_upload(model, trusted=trusted)
    archives.extract(model, work / "model")
    return work / "model"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _outputs(exports: list[Exported]) -> list[str]:
    """One line per file written, its whole path (a table cell would cut it) and its checks."""
    lines = []
    for exported in exports:
        checks = ", ".join(
            f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
            for k, v in exported.checks.items()
        )
        lines.append(f"→ {exported.format}: {exported.path}" + (f"  ({checks})" if checks else ""))
    return lines
