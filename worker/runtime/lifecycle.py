"""The lifecycles behind the tasks, free of Celery: a model's validation, and a job's claim,
lease, heartbeat and finish (the steps in between are worker/pipeline/steps.py), and the reaper.

A job: claim (queued → running, the lease taken) → the steps, with heartbeats that carry progress
and see a cancel → publish artifacts and finish in one transaction guarded by the lease. The
reaper returns jobs whose lease went stale.
"""

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError

from service.artifacts import repository as artifacts_repository
from service.blobs import repository as blobs
from service.blobs import service as retention
from service.core import archives
from service.core.db import get_sessionmaker
from service.core.errors import CodedError
from service.core.orm import Artifact, Dataset, Model, utcnow
from service.core.settings import Settings, get_settings
from service.core.store import StoreFull, StoreUnavailable, get_store, store_file
from service.datasets import repository as datasets_repository
from service.jobs import repository
from service.jobs.results import JobResult, Progress
from service.jobs.schemas import JobSpec
from service.jobs.states import JobState
from service.models import repository as models_repository
from service.models.states import ModelState
from service.workers import repository as workers_repository
from worker.engine import (
    EngineError,
    PruneConfig,
    TargetUnreachable,
    measure,
    reachable_fraction,
)
from worker.pipeline import memory, models
from worker.pipeline.export import Exported
from worker.pipeline.steps import JobFailed, JobFiles, execute

log = logging.getLogger("apoptosis.worker")
T = TypeVar("T")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
VALIDATION_GRACE = 10  # × stale_after_seconds before a validating model is retried
SILENT_WORKER_KEPT = timedelta(days=1)  # a killed worker's heartbeat row, kept for inspection


class Cancelled(Exception):
    """The job was cancelled; raised between steps."""


class LeaseLost(Exception):
    """Another worker (or the reaper) took the job over; stop without touching it."""


def device(settings: Settings) -> torch.device:
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@contextmanager
def _model_files(model: Model, work: Path) -> Iterator[Path]:
    """The upload as the loader wants it: an extracted folder (hf) or the file itself."""
    with get_store().local_path(model.blob_key) as blob:
        if model.format != "hf":
            yield blob
            return
        archives.extract(blob, work / "model")
    yield work / "model"


def validate_model(model_id: str) -> None:
    """validating → ready (params, MACs, inputs recorded) or rejected (with a readable reason)."""
    settings = get_settings()
    with get_sessionmaker()() as session:
        model = models_repository.by_id(session, model_id)
        if model is None or model.state != ModelState.VALIDATING:
            return
        summary: dict[str, Any] = {}
        reason = None
        try:
            with tempfile.TemporaryDirectory() as work, _model_files(model, Path(work)) as root:
                loaded = models.load(root, model.format, trusted=settings.trusted_mode)
                summary = _summary(loaded)
        except (archives.UnsafeArchive, models.ModelRejected) as error:
            reason = f"{error.code}: {error}"
        except Exception as error:  # a model we cannot run is rejected, never a crash
            log.exception("validation of model %s failed", model_id)
            reason = f"invalid_model: {error}"
        state = ModelState.REJECTED if reason else ModelState.READY
        models_repository.settle(session, model_id, state, summary, reason)
        session.commit()


def _summary(loaded: models.LoadedModel) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "architecture": type(loaded.model).__name__,
        "kind": loaded.kind,
        "params": sum(p.numel() for p in loaded.model.parameters()),
    }
    if loaded.kind != "tensor":  # a pickled module's inputs are known only from its data
        inputs = models.example_inputs(loaded)
        summary["macs"] = measure(loaded.model, inputs).macs
        summary["inputs"] = {
            k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)
        }
        summary["reachable_params"] = _reachable_params(loaded.model, inputs)
    return summary


def _reachable_params(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, float]:
    """The least fraction of parameters channel pruning reaches, with global and with uniform
    widths (the hf output): the API refuses lower parameter targets at submit."""
    reachable = {}
    for allocation, global_ranking in (("global", True), ("uniform", False)):
        config = PruneConfig(target_metric="params", global_ranking=global_ranking)
        try:
            reachable[allocation] = round(reachable_fraction(model, inputs, config), 6)
        except EngineError:  # a model we cannot prune structurally says so in its job
            log.info("no reachable %s params for a %s", allocation, type(model).__name__)
    return reachable


class _Heartbeat:
    """Refreshes the job's lease in the background; tells the steps when to stop."""

    def __init__(self, job_id: str, interval: float, time_limit: float) -> None:
        self.job_id = job_id
        self.interval = interval
        self.time_limit = time_limit
        self.deadline = time.monotonic() + time_limit
        self.state: str | None = JobState.RUNNING
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def beat(self, progress: Progress | None = None) -> None:
        """Renew the lease (and record `progress`); the state read back tells the steps whether
        to go on. Progress is advisory: a database that cannot take it is logged, not fatal."""
        recorded = progress.model_dump(mode="json") if progress is not None else None

        def write() -> None:
            with get_sessionmaker()() as session:
                self.state = repository.heartbeat(session, self.job_id, WORKER_ID, recorded)
                if recorded is not None and self.state is not None:
                    repository.add_event(session, self.job_id, "progress", recorded)
                session.commit()

        try:
            _retrying(write)
        except DBAPIError:
            if progress is None:
                raise  # the background beat logs it and tries again next interval
            log.warning("job %s: progress not recorded, the database did not answer", self.job_id)

    def check(self) -> None:
        if self.state is None:
            raise LeaseLost(self.job_id)
        if self.state == JobState.CANCELLING:
            raise Cancelled(self.job_id)
        if time.monotonic() > self.deadline:  # the soft limit, seen between steps
            raise JobFailed(
                "time_limit",
                f"the job ran past the operator's limit of {self.time_limit:g} s; ask for "
                "less work (fewer steps, batches or epochs) or a smaller model",
            )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # a missed beat is retried; the reaper tolerates several
                log.exception("heartbeat of job %s failed", self.job_id)


@dataclass
class _Inputs:
    """What a claimed job reads from the database: its spec and the rows of its files (None
    where a row is gone)."""

    spec: JobSpec
    model: Model | None
    dataset: Dataset | None
    held_out: Dataset | None
    gone: bool  # the model, the dataset or the evaluation dataset no longer exists


def run_job(job_id: str) -> None:
    settings = get_settings()
    if not _retrying(lambda: _claim(job_id)):
        return  # already taken, finished or cancelled: a duplicate delivery
    inputs = _read_inputs(job_id)
    if inputs is None:
        return
    log.info("job %s claimed by %s", job_id, WORKER_ID)
    with _Heartbeat(job_id, settings.heartbeat_seconds, settings.job_soft_time_limit) as heartbeat:
        try:
            _execute(job_id, inputs, heartbeat, settings)
        except Cancelled:
            _end(job_id, JobState.CANCELLED, None)
        except LeaseLost:
            log.warning("job %s: lease lost, leaving it to its new owner", job_id)
        # every failure with a code the user can act on: ours (CodedError: rejected inputs,
        # unsafe archives, exports that fail or differ, memory), the engine's, the store's
        except (CodedError, EngineError, StoreFull, StoreUnavailable) as error:
            _end(job_id, JobState.FAILED, _coded(error))
        except (torch.OutOfMemoryError, MemoryError) as error:
            # What the job held is garbage once this frame is left; the worker takes the next.
            log.warning("job %s ran out of memory", job_id)
            failure = memory.describe(error, device(settings))
            _end(job_id, JobState.FAILED, {"code": failure.code, "message": str(failure)})
        except Exception as error:
            log.exception("job %s failed", job_id)
            _end(job_id, JobState.FAILED, {"code": "internal_error", "message": str(error)})


def _read_inputs(job_id: str) -> _Inputs | None:
    """The claimed job's spec and file rows; None when its stored spec is not one this worker
    accepts (the job is then failed as `invalid_job`)."""
    with get_sessionmaker()() as session:
        job = repository.by_id(session, job_id)
        assert job is not None
        try:  # the API's own model: a spec stored by another version is checked, not trusted
            spec = JobSpec.model_validate(job.spec)
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"]) or "spec"
            _end(
                job_id,
                JobState.FAILED,
                {"code": "invalid_job", "message": f"{where}: {problem['msg']}"},
            )
            return None
        model = models_repository.by_id(session, job.model_id)
        dataset = datasets_repository.by_id(session, job.dataset_id)
        eval_id = spec.evaluation.dataset_id if spec.evaluation else None
        held_out = datasets_repository.by_id(session, eval_id)
    gone = model is None or dataset is None or bool(eval_id and held_out is None)
    return _Inputs(spec, model, dataset, held_out, gone)


def _execute(job_id: str, inputs: _Inputs, heartbeat: _Heartbeat, settings: Settings) -> None:
    """Fetch the job's files, run it and store what it made; progress goes through the
    heartbeat, which also raises `Cancelled` or `LeaseLost`."""

    def report(progress: Progress) -> None:
        heartbeat.beat(progress)
        heartbeat.check()

    model, dataset, held_out = inputs.model, inputs.dataset, inputs.held_out
    if inputs.gone or model is None or dataset is None:
        raise JobFailed("missing_input", "the job's model or dataset no longer exists")
    with (
        tempfile.TemporaryDirectory() as work,
        _model_files(model, Path(work)) as model_root,
        _optional_blob(dataset.blob_key) as data,
        _optional_blob(held_out.blob_key if held_out else None) as evaluation,
    ):
        assert data is not None
        files = JobFiles(model_root, model.format, data, dataset.format, evaluation, Path(work))
        result, exports = execute(
            inputs.spec,
            files,
            device(settings),
            settings.trusted_mode,
            report,
            heartbeat.check,
            settings.worker_memory_bytes,
        )
        _finish(job_id, result, exports)


@contextmanager
def _optional_blob(key: str | None) -> Iterator[Path | None]:
    if key is None:
        yield None
        return
    with get_store().local_path(key) as path:
        yield path


def _claim(job_id: str) -> bool:
    """queued → running for this worker (attempt + 1). After a commit whose answer was lost, the
    retry finds the job taken and says no: the reaper returns it once its lease goes stale."""
    with get_sessionmaker()() as session:
        if not repository.claim(session, job_id, WORKER_ID):
            session.rollback()
            return False
        session.commit()
        return True


def _finish(job_id: str, result: JobResult, exports: list[Exported]) -> None:
    """Upload, then record artifacts and success in one transaction guarded by the lease."""
    store = get_store()
    started = time.perf_counter()
    stored = [(e, store_file(e.path, store)) for e in exports]
    result.seconds["store"] = time.perf_counter() - started

    def write() -> None:
        with get_sessionmaker()() as session:
            job = repository.by_id(session, job_id)
            assert job is not None
            if not repository.transition(
                session,
                job_id,
                JobState.SUCCEEDED,
                owner=WORKER_ID,
                result=result.model_dump(mode="json"),
                finished_at=utcnow(),
                progress=Progress(stage="done", percent=100).model_dump(mode="json"),
            ):
                session.rollback()
                raise LeaseLost(job_id)
            for export, blob in stored:
                artifacts_repository.add(
                    session,
                    Artifact(
                        tenant_id=job.tenant_id,
                        job_id=job_id,
                        format=export.format,
                        filename=export.path.name,
                        blob_key=blob.key,
                        sha256=blob.sha256,
                        size=blob.size,
                        target=export.target,
                    ),
                )
                blobs.record(session, blob)
            session.commit()

    _retrying(write)
    for export, blob in stored:
        retention.confirm_stored(store, blob, export.path)


def _coded(error: CodedError | EngineError | StoreFull | StoreUnavailable) -> dict[str, Any]:
    """A coded failure as the job's `error` (`JobError`): its code and message, and for a
    target pruning cannot reach, the metric and what is reachable, as fields."""
    body: dict[str, Any] = {"code": error.code, "message": str(error)}
    if isinstance(error, TargetUnreachable):
        body |= {"metric": error.metric, "reachable": error.reachable}
        if error.per_layer is not None:
            body["per_layer"] = error.per_layer
    return body


def _end(job_id: str, state: JobState, error: dict[str, str] | None) -> None:
    def write() -> None:
        with get_sessionmaker()() as session:
            if repository.transition(
                session, job_id, state, owner=WORKER_ID, error=error, finished_at=utcnow()
            ):
                session.commit()

    _retrying(write)


def _retrying(write: Callable[[], T]) -> T:
    """A short transaction, run again once if the database dropped its connection (a restart,
    a failover, a terminated backend): the pool's pre-ping checks a connection when it is
    taken, not one that dies during the transaction. A commit whose answer was lost is safe
    to repeat: every change here is a guarded update that does nothing the second time."""
    try:
        return write()
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
        log.warning("the database dropped a connection; trying once more")
        return write()


def reap(settings: Settings) -> tuple[list[str], list[str]]:
    """Return stale running jobs to the queue (or fail them after max attempts); stale
    cancelling jobs end cancelled. Queued jobs and validating models left far longer than a
    send or a validation takes (their message was lost: a broker restarted empty, a worker
    was killed) are sent again.

    Returns the job ids and model ids to enqueue again.
    """
    requeue = []
    stale_after = timedelta(seconds=settings.stale_after_seconds)
    with get_sessionmaker()() as session:
        for job in repository.stale(session, stale_after):
            if job.state == JobState.CANCELLING:
                repository.transition(session, job.id, JobState.CANCELLED, finished_at=utcnow())
            elif job.attempt < job.max_attempts:
                if repository.transition(
                    session,
                    job.id,
                    JobState.QUEUED,
                    lease_owner=None,
                    heartbeat_at=None,
                    sent_at=utcnow(),
                ):
                    requeue.append(job.id)
            else:
                repository.transition(
                    session,
                    job.id,
                    JobState.FAILED,
                    finished_at=utcnow(),
                    error={
                        "code": "worker_lost",
                        "message": f"the worker stopped responding {job.attempt} times",
                    },
                )
        cutoff = utcnow() - VALIDATION_GRACE * stale_after
        requeue += repository.unsent_since(session, cutoff)  # messages a broker lost
        workers_repository.forget_silent_since(session, utcnow() - SILENT_WORKER_KEPT)
        session.commit()
        models_to_validate = models_repository.validating_since(session, cutoff)
    return requeue, models_to_validate
