"""Logging a finished job to the MLflow tracking server its spec names (the `mlflow` extra).

One run per job: the spec as params (flattened: `target.macs`), the before / after pruning /
after fine-tuning metrics, MACs, params and loss per pruning step (as the metric's steps), the
report (JSON) and the exported model files as artifacts. The job's result records the run, or
why it could not be logged: a tracking server that is down does not undo a pruning that
succeeded.
"""

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from service.jobs.schemas import JobSpec
from service.settings import get_settings
from service.webhooks import targets
from worker.export import Exported

MEASURES = ("before", "after_pruning", "after_finetune")


# MLflow's client retries a failing server 7 times with doubling waits (minutes); a job waits
# for a tracking server far less. An operator's own setting wins.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def log_job(spec: JobSpec, result: dict[str, Any], exports: list[Exported]) -> dict[str, Any]:
    """Log the job; `{"run_id", "experiment_id", "tracking_uri"}`, or `{"error": …}`."""
    assert spec.mlflow is not None
    for name, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    tracking_uri = spec.mlflow.tracking_uri
    try:
        targets.check(tracking_uri, get_settings().webhook_allow)
        from mlflow.tracking import MlflowClient
    except targets.TargetRefused as error:
        return {"error": f"mlflow.tracking_uri: {error}"}
    except ImportError:
        return {"error": "this worker has no mlflow: install apoptosis[worker,mlflow]"}
    try:
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name(spec.mlflow.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(spec.mlflow.experiment)
        )
        run = client.create_run(experiment_id, run_name=spec.mlflow.run_name)
        run_id = run.info.run_id
        _log(client, run_id, spec, result, exports)
        client.set_terminated(run_id)
    except Exception as error:  # any client or server failure: the job's result says so
        return {"error": f"{type(error).__name__}: {error}"[:500], "tracking_uri": tracking_uri}
    return {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri}


def _log(
    client: Any, run_id: str, spec: JobSpec, result: dict[str, Any], exports: list[Exported]
) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    params = [Param(key, str(value)[:6000]) for key, value in _flat(spec.model_dump(mode="json"))]
    metrics = [Metric(key, float(value), now, 0) for key, value in _final_metrics(result)]
    for row in result.get("steps", []):
        metrics += [
            Metric(f"step_{name}", float(row[name]), now, int(row["step"]))
            for name in ("macs", "params", "loss")
        ]
    client.log_batch(run_id, metrics=metrics, params=params)
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        report.write_text(json.dumps({"spec": spec.model_dump(mode="json"), "result": result}))
        client.log_artifact(run_id, str(report))
    for exported in exports:
        client.log_artifact(run_id, str(exported.path), artifact_path="model")


def _final_metrics(result: dict[str, Any]) -> list[tuple[str, float]]:
    found = [
        (f"{measure}_{name}", value)
        for measure in MEASURES
        for name, value in (result.get(measure) or {}).items()
    ]
    found += [
        (key, result[key]) for key in ("macs_before", "macs_after", "params_before", "params_after")
    ]
    found.append(("macs_kept", result["macs_after"] / max(result["macs_before"], 1)))
    return found


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _flat(item, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), value)] if value is not None else []
