"""`apoptosis prune`: the job's steps in-process, for people who want the engine without a
server. Same loading, checks, engine and exports as a worker; a progress bar instead of SSE."""

import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service import archives
from service.errors import CodedError
from service.jobs.schemas import JobSpec
from service.settings import get_settings
from worker import precision
from worker.engine import EngineError
from worker.export import Exported
from worker.steps import JobFiles, execute

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

            def report(update: dict[str, Any]) -> None:
                label = update["stage"]
                if "step" in update:
                    label = f"pruning step {update['step']}/{update['total']}"
                progress.update(bar, completed=update.get("percent", 0), description=label)

            try:
                result, exports = execute(checked, files, _device(device), trusted, report)
            except USER_ERRORS as error:  # one line, what to do; never a traceback
                progress.stop()
                console.print(f"[red]error[/red] {error.code}: {error}")
                raise SystemExit(2) from error
    console.print(_table(result, exports, checked.target.metric, checked.target.value))
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


def _table(result: dict[str, Any], exports: list[Exported], metric: str, target: float) -> Table:
    if metric == "sparsity":
        title = f"before → after (sparsity {result['sparsity']:.4f}, target {target:g})"
    else:
        reached = result[f"{metric}_after"] / result[f"{metric}_before"]
        title = f"before → after ({metric} kept {reached:.4f}, target {target:g})"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after pruning", justify="right")
    table.add_column("after fine-tuning", justify="right")
    tuned = result.get("after_finetune") or {}
    table.add_row("MACs", f"{result['macs_before']:,}", f"{result['macs_after']:,}", "")
    table.add_row("params", f"{result['params_before']:,}", f"{result['params_after']:,}", "")
    for key in ("loss", "accuracy", "latency_ms"):
        if key in result["before"]:
            table.add_row(
                key,
                f"{result['before'][key]:.4g}",
                f"{result['after_pruning'][key]:.4g}",
                f"{tuned[key]:.4g}" if key in tuned else "",
            )
    for exported in exports:
        checks = ", ".join(
            f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
            for k, v in exported.checks.items()
        )
        table.add_row(f"→ {exported.format}", "", str(exported.path), checks)
    return table
