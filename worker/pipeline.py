"""The work behind the tasks, free of Celery: validate a model, run a job.

A job: claim (queued → running) → load model and data → prune with progress events and
cancellation checks between steps → export → publish artifacts and finish in one transaction.
"""

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args

import torch
from sqlalchemy import select, update

from service import archives
from service.db import get_sessionmaker
from service.jobs import repository
from service.jobs.states import CANCELLED, CANCELLING, FAILED, QUEUED, SUCCEEDED
from service.orm import Artifact, Dataset, Job, Model, utcnow
from service.settings import Settings, get_settings
from service.storage import get_store
from worker import datasets, export, losses, models
from worker.engine import EngineError, PruneConfig, StepRecord, measure, prune
from worker.engine.config import TargetMetric

log = logging.getLogger("apoptosis.worker")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
VALIDATION_GRACE = 10  # × stale_after_seconds before a validating model is retried


class Cancelled(Exception):
    """The job was cancelled; raised between steps."""


class LeaseLost(Exception):
    """Another worker (or the reaper) took the job over; stop without touching it."""


class JobFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def device(settings: Settings) -> torch.device:
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@contextmanager
def _unpacked_model(model: Model, work: Path, trusted: bool) -> Iterator[models.LoadedModel]:
    with get_store().local_path(model.blob_key) as archive:
        archives.extract(archive, work / "model")
    yield models.load_hf(work / "model", trusted=trusted)


def validate_model(model_id: str) -> None:
    """validating → ready (params, MACs, inputs recorded) or rejected (with a readable reason)."""
    settings = get_settings()
    with get_sessionmaker()() as session:
        model = session.get(Model, model_id)
        if model is None or model.state != "validating":
            return
        summary: dict[str, Any] = {}
        reason = None
        try:
            with (
                tempfile.TemporaryDirectory() as work,
                _unpacked_model(model, Path(work), settings.trusted_mode) as loaded,
            ):
                inputs = models.example_inputs(loaded)
                cost = measure(loaded.model, inputs)
                summary = {
                    "params": cost.params,
                    "macs": cost.macs,
                    "kind": loaded.kind,
                    "architecture": type(loaded.model).__name__,
                    "inputs": {
                        k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)
                    },
                }
        except (archives.UnsafeArchive, models.ModelRejected) as error:
            reason = f"{error.code}: {error}"
        except Exception as error:  # a model we cannot run is rejected, never a crash
            log.exception("validation of model %s failed", model_id)
            reason = f"invalid_model: {error}"
        state = "rejected" if reason else "ready"
        session.execute(
            update(Model)
            .where(Model.id == model_id, Model.state == "validating")
            .values(state=state, summary=summary, rejection_reason=reason)
        )
        session.commit()


class _Heartbeat:
    """Refreshes the job's lease in the background; tells the pipeline when to stop."""

    def __init__(self, job_id: str, interval: float) -> None:
        self.job_id = job_id
        self.interval = interval
        self.state: str | None = "running"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def beat(self, progress: dict[str, Any] | None = None) -> None:
        with get_sessionmaker()() as session:
            self.state = repository.heartbeat(session, self.job_id, WORKER_ID, progress)
            if progress is not None and self.state is not None:
                repository.add_event(session, self.job_id, "progress", progress)
            session.commit()

    def check(self) -> None:
        if self.state is None:
            raise LeaseLost(self.job_id)
        if self.state == CANCELLING:
            raise Cancelled(self.job_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # a missed beat is retried; the reaper tolerates several
                log.exception("heartbeat of job %s failed", self.job_id)


def run_job(job_id: str) -> None:
    settings = get_settings()
    with get_sessionmaker()() as session:
        if not repository.claim(session, job_id, WORKER_ID):
            session.rollback()
            return  # already taken, finished or cancelled: a duplicate delivery
        session.commit()
        job = session.get(Job, job_id)
        assert job is not None
        model, dataset = session.get(Model, job.model_id), session.get(Dataset, job.dataset_id)
        spec = dict(job.spec)
    log.info("job %s claimed by %s", job_id, WORKER_ID)
    with _Heartbeat(job_id, settings.heartbeat_seconds) as heartbeat:
        try:
            if model is None or dataset is None:
                raise JobFailed("missing_input", "the job's model or dataset no longer exists")
            with tempfile.TemporaryDirectory() as work:
                result, files = _prune(spec, model, dataset, Path(work), heartbeat, settings)
                _finish(job_id, result, files)
        except Cancelled:
            _end(job_id, CANCELLED, None)
        except LeaseLost:
            log.warning("job %s: lease lost, leaving it to its new owner", job_id)
        except JobFailed as error:
            _end(job_id, FAILED, {"code": error.code, "message": str(error)})
        except EngineError as error:
            _end(job_id, FAILED, {"code": error.code, "message": str(error)})
        except (archives.UnsafeArchive, models.ModelRejected, datasets.DatasetRejected) as error:
            _end(job_id, FAILED, {"code": error.code, "message": str(error)})
        except Exception as error:
            log.exception("job %s failed", job_id)
            _end(job_id, FAILED, {"code": "internal_error", "message": str(error)})


def _prune(
    spec: dict[str, Any],
    model: Model,
    dataset: Dataset,
    work: Path,
    heartbeat: _Heartbeat,
    settings: Settings,
) -> tuple[dict[str, Any], list[tuple[str, Path]]]:
    stages: dict[str, float] = {}
    started = time.perf_counter()
    target_device = device(settings)
    heartbeat.beat({"stage": "loading", "percent": 0})
    with _unpacked_model(model, work, settings.trusted_mode) as loaded:
        with get_store().local_path(dataset.blob_key) as data_path:
            columns = datasets.load_tensors(data_path)
        net = loaded.model.to(target_device)
        calibration = datasets.batches(
            columns,
            spec["calibration"]["batches"],
            spec["calibration"]["batch_size"],
            target_device,
        )
        if not calibration:
            raise JobFailed("empty_dataset", "the dataset has no rows")
        loss_fn = losses.make_loss(spec["loss"], net)
        example = {
            k: v.to(target_device) if isinstance(v, torch.Tensor) else v
            for k, v in models.example_inputs(loaded).items()
        }
        stages["load"] = time.perf_counter() - started
        heartbeat.check()
        target = spec["target"]
        metric: TargetMetric = next(m for m in get_args(TargetMetric) if target.get(m) is not None)
        steps = spec["schedule"]["steps"]
        config = PruneConfig(
            method=spec["method"],
            granularity=spec["granularity"],
            target_metric=metric,
            target=target[metric],
            steps=steps,
            schedule=spec["schedule"]["kind"],
            global_ranking="hf" not in spec["outputs"],
        )  # hf: widths a config can describe

        def on_step(record: StepRecord) -> None:
            heartbeat.beat(
                {
                    "stage": "pruning",
                    "step": record.step,
                    "total": steps,
                    "percent": round(100 * record.step / steps, 1),
                    "macs": record.macs,
                    "params": record.params,
                }
            )
            heartbeat.check()

        with torch.no_grad():
            loss_before = float(loss_fn(net, calibration[0]))
        pruned_at = time.perf_counter()
        try:
            result = prune(net, example, calibration, loss_fn, config, on_step=on_step)
        except ValueError as error:  # e.g. a loss that needs labels the dataset lacks
            raise JobFailed("invalid_job", str(error)) from error
        stages["prune"] = time.perf_counter() - pruned_at
        with torch.no_grad():
            loss_after = float(loss_fn(net, calibration[0]))
        heartbeat.beat({"stage": "exporting", "percent": 100})
        exported_at = time.perf_counter()
        files = [("hf", export.export_hf(net.cpu(), loaded.directory, work))]
        stages["export"] = time.perf_counter() - exported_at
    return {
        "params_before": result.initial_params,
        "params_after": result.params,
        "macs_before": result.initial_macs,
        "macs_after": result.macs,
        "target_met": result.target_met,
        "sparsity": result.sparsity,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "config_updates": result.config_updates,
        "widths": result.history[-1].widths if result.history else {},
        "seconds": stages,
    }, files


def _finish(job_id: str, result: dict[str, Any], files: list[tuple[str, Path]]) -> None:
    """Upload, then record artifacts and success in one transaction guarded by the lease."""
    store = get_store()
    blobs = []
    for fmt, path in files:
        with path.open("rb") as file:
            blobs.append((fmt, path.name, store.put_stream(iter(lambda: file.read(1 << 20), b""))))
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        assert job is not None
        if not repository.transition(
            session,
            job_id,
            SUCCEEDED,
            owner=WORKER_ID,
            result=result,
            finished_at=utcnow(),
            progress={"stage": "done", "percent": 100},
        ):
            session.rollback()
            raise LeaseLost(job_id)
        for fmt, name, blob in blobs:
            session.add(
                Artifact(
                    tenant_id=job.tenant_id,
                    job_id=job_id,
                    format=fmt,
                    filename=name,
                    blob_key=blob.key,
                    sha256=blob.sha256,
                    size=blob.size,
                )
            )
        session.commit()


def _end(job_id: str, state: str, error: dict[str, str] | None) -> None:
    with get_sessionmaker()() as session:
        if repository.transition(
            session, job_id, state, owner=WORKER_ID, error=error, finished_at=utcnow()
        ):
            session.commit()


def reap(settings: Settings) -> tuple[list[str], list[str]]:
    """Return stale running jobs to the queue (or fail them after max attempts); stale
    cancelling jobs end cancelled. Models left validating far longer than a validation takes
    (their message was lost with a killed worker) are validated again.

    Returns the job ids and model ids to enqueue again.
    """
    requeue = []
    stale_after = timedelta(seconds=settings.stale_after_seconds)
    with get_sessionmaker()() as session:
        for job in repository.stale(session, stale_after):
            if job.state == CANCELLING:
                repository.transition(session, job.id, CANCELLED, finished_at=utcnow())
            elif job.attempt < job.max_attempts:
                if repository.transition(
                    session, job.id, QUEUED, lease_owner=None, heartbeat_at=None
                ):
                    requeue.append(job.id)
            else:
                repository.transition(
                    session,
                    job.id,
                    FAILED,
                    finished_at=utcnow(),
                    error={
                        "code": "worker_lost",
                        "message": f"the worker stopped responding {job.attempt} times",
                    },
                )
        session.commit()
        cutoff = utcnow() - VALIDATION_GRACE * stale_after
        models_to_validate = list(
            session.scalars(
                select(Model.id).where(Model.state == "validating", Model.created_at < cutoff)
            )
        )
    return requeue, models_to_validate
