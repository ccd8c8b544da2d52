"""Logging a finished job to the MLflow tracking server its spec names.

One run per job: the spec as params (flattened: `target.macs`), the before / after pruning /
after fine-tuning metrics, MACs, params and loss per pruning step (as the metric's steps), the
report (JSON) and the exported model files as artifacts. The job's result records the run, or
why it could not be logged: a tracking server that is down does not undo a pruning that
succeeded. Every call goes through the guarded outbound client (`worker.pipeline.mlflow_api`);
artifacts go only through the server's artifact proxy, and where the server names another place
the run is logged without them and the result says why (`artifacts_error`).
"""

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from service.core.settings import get_settings
from service.jobs.results import JobResult, TrackingRun
from service.jobs.schemas import JobSpec
from worker.pipeline.export import Exported
from worker.pipeline.mlflow_api import ArtifactsRefused, TrackingError, TrackingServer

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value


def log_job(spec: JobSpec, result: JobResult, exports: list[Exported]) -> TrackingRun:
    """Log the job: the run (with `artifacts_error` when the artifacts were refused), or the
    `error` that kept it from being logged."""
    assert spec.mlflow is not None
    settings = get_settings()
    tracking_uri = spec.mlflow.tracking_uri
    server = TrackingServer(tracking_uri, settings.webhook_allow, settings.tracking_timeout_seconds)
    logged = TrackingRun(tracking_uri=tracking_uri)
    try:
        experiment_id = server.experiment_id(spec.mlflow.experiment)
        run = server.create_run(experiment_id, spec.mlflow.run_name, _now_ms())
        logged.run_id, logged.experiment_id = run["run_id"], experiment_id
        server.log_batch(run["run_id"], _metrics(result), _params(spec))
        try:
            _log_artifacts(server, str(run.get("artifact_uri", "")), spec, result, exports)
        except ArtifactsRefused as refused:
            logged.artifacts_error = str(refused)
        server.finish(run["run_id"], _now_ms())
    except TrackingError as error:
        return TrackingRun(tracking_uri=tracking_uri, error=str(error)[:500])
    return logged


def _log_artifacts(
    server: TrackingServer,
    artifact_uri: str,
    spec: JobSpec,
    result: JobResult,
    exports: list[Exported],
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        report.write_text(
            json.dumps(
                {"spec": spec.model_dump(mode="json"), "result": result.model_dump(mode="json")}
            )
        )
        server.upload(artifact_uri, report)
    for exported in exports:
        server.upload(artifact_uri, exported.path, "model")


def _params(spec: JobSpec) -> list[dict[str, str]]:
    flat = _flat(spec.model_dump(mode="json"))
    return [{"key": key, "value": str(value)[:MAX_PARAM_CHARS]} for key, value in flat]


def _metrics(result: JobResult) -> list[dict[str, Any]]:
    now = _now_ms()
    metrics = [
        {"key": key, "value": float(value), "timestamp": now, "step": 0}
        for key, value in _final_metrics(result)
    ]
    for row in result.steps:
        metrics += [
            {"key": f"step_{name}", "value": float(value), "timestamp": now, "step": row.step}
            for name, value in (("macs", row.macs), ("params", row.params), ("loss", row.loss))
            if value is not None
        ]
    return metrics


def _final_metrics(result: JobResult) -> list[tuple[str, float]]:
    measured = {
        "before": result.before,
        "after_pruning": result.after_pruning,
        "after_finetune": result.after_finetune,
    }
    found = [
        (f"{stage}_{name}", value)
        for stage, metrics in measured.items()
        if metrics is not None
        for name, value in metrics.model_dump().items()
    ]
    found += [
        ("macs_before", result.macs_before),
        ("macs_after", result.macs_after),
        ("params_before", result.params_before),
        ("params_after", result.params_after),
        ("macs_kept", result.macs_after / max(result.macs_before, 1)),
    ]
    return found


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _flat(item, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), value)] if value is not None else []


def _now_ms() -> int:
    return int(time.time() * 1000)
