"""Job use cases: create (idempotently), cancel, delete."""

from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.core import queue
from service.core.orm import Dataset, Job, Model, utcnow
from service.core.problems import ProblemError, found
from service.core.settings import get_settings
from service.jobs import repository
from service.jobs.schemas import JobSpec
from service.jobs.states import TERMINAL, JobState
from service.models.states import ModelState
from service.outbound import guard
from service.tenants import repository as tenants
from service.tenants.repository import Owned
from service.webhooks import secret

RETRY_AFTER_SECONDS = 30  # a small job's run: when a slot is likely to be free again


def create(
    session: Session, tenant_id: str, spec: JobSpec, idempotency_key: str | None
) -> tuple[Job, bool]:
    """The job for this spec, and whether it is new. A repeated key returns the first job.

    A retry of a job still queued sends it again: its first send may have failed after the
    commit, and a duplicate delivery is a no-op for the worker's claim.
    """
    idempotency_key = idempotency_key or None  # an empty header is no key
    if idempotency_key:
        existing = repository.by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            _same_spec(existing, spec)
            if existing.state == JobState.QUEUED:
                _send(existing.id)
            return existing, False
    _check_submittable(session, tenant_id, spec)
    _take_a_slot(session, tenant_id)
    settings = get_settings()
    job = Job(
        tenant_id=tenant_id,
        model_id=spec.model_id,
        dataset_id=spec.dataset_id,
        spec=spec.model_dump(mode="json"),
        idempotency_key=idempotency_key,
        max_attempts=settings.job_max_attempts,
        state=JobState.QUEUED,
        sent_at=utcnow(),  # sent right after the commit
    )
    try:
        repository.add(session, job)
        session.commit()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        existing = repository.by_idempotency_key(session, tenant_id, idempotency_key or "")
        if existing is None:
            raise
        return _same_spec(existing, spec), False
    _send(job.id)
    return job, True


def _check_submittable(session: Session, tenant_id: str, spec: JobSpec) -> None:
    """Refuse a spec this tenant cannot run: objects it does not own, a model not ready, a
    target out of reach, unsafe outputs, callbacks to non-public addresses."""
    model = _owned(session, Model, tenant_id, spec.model_id)
    dataset = _owned(session, Dataset, tenant_id, spec.dataset_id)
    if spec.evaluation is not None and spec.evaluation.dataset_id is not None:
        held_out = _owned(session, Dataset, tenant_id, spec.evaluation.dataset_id)
        if held_out.format != dataset.format:
            raise ProblemError(
                422,
                "evaluation_format_mismatch",
                "the evaluation dataset must have the format of the dataset",
            )
    if "torch_pickle" in spec.outputs and not get_settings().trusted_mode:
        raise ProblemError(
            422,
            "unsafe_format",
            "torch_pickle outputs need trusted mode; choose hf, safetensors, onnx or pt2",
        )
    if model.state != ModelState.READY:
        raise ProblemError(
            409,
            "model_not_ready",
            f"model {model.id!r} is {model.state}; jobs need a ready model",
            model_state=model.state,
        )
    _check_reachable(model, spec)
    if spec.notify_url is not None:
        _check_target(spec.notify_url, "notify_url")
        secret.ensure(session, tenant_id)  # the receiver reads it with GET /v1/webhooks/secret
    if spec.mlflow is not None:
        _check_target(spec.mlflow.tracking_uri, "mlflow.tracking_uri")


def _take_a_slot(session: Session, tenant_id: str) -> None:
    """Count the tenant's active jobs under its lock, refusing one over the limit (429)."""
    settings = get_settings()
    # Count, then add, holding the tenant's row until the commit: submits that arrive together
    # take turns, each counting the jobs the ones before it added. The lock opens a transaction
    # of its own (see `tenants.lock`); what was read so far ends with the one before.
    session.commit()
    tenants.lock(session, tenant_id)
    if repository.active_count(session, tenant_id) >= settings.max_active_jobs:
        raise ProblemError(
            429,
            "too_many_jobs",
            f"this tenant has {settings.max_active_jobs} jobs queued or running, the limit; "
            "submit again when one has ended",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            limit=settings.max_active_jobs,
        )


def _check_target(url: str, field: str) -> None:
    """A URL the worker will call: refused when it reaches a non-public address (SSRF)."""
    try:
        guard.check(url, get_settings().webhook_allow)
    except guard.TargetRefused as error:
        code = f"{field.split('.')[0]}_refused"
        raise ProblemError(422, code, f"{field}: {error}") from error


def _owned(session: Session, kind: type[Owned], tenant_id: str, row_id: str) -> Owned:
    return found(tenants.owned(session, kind, tenant_id, row_id), kind.__tablename__, row_id)


def _check_reachable(model: Model, spec: JobSpec) -> None:
    """Refuse a parameter target below what the worker measured reachable when it validated the
    model (`summary.reachable_params`, default switches). MAC fractions depend on the input
    shape the data brings, so those are checked by the job before it prunes."""
    reachable = (model.summary or {}).get("reachable_params") or {}
    allocation = "uniform" if spec.uniform_widths else "global"
    default_switches = spec.hidden_size is None and not spec.depth_share
    if (
        spec.granularity != "channel"
        or spec.target.params is None
        or not default_switches
        or allocation not in reachable
    ):
        return
    if spec.target.params < reachable[allocation]:
        raise ProblemError(
            422,
            "target_unreachable",
            f"this model keeps at least {reachable[allocation]:.4f} of its params with "
            f"{'the hf output (uniform widths)' if allocation == 'uniform' else 'channel pruning'}"
            f"; ask for {reachable[allocation]:.4f} or more",
            metric="params",
            reachable=reachable[allocation],
        )


def _send(job_id: str) -> None:
    try:
        queue.enqueue_job(job_id, get_settings().job_queue)
    except Exception as error:  # any transport failure: the job is saved, the send is not
        raise ProblemError(
            503,
            "broker_unavailable",
            "the job is saved but could not be queued; retry the request with "
            "the same Idempotency-Key",
            job_id=job_id,
        ) from error


def _same_spec(job: Job, spec: JobSpec) -> Job:
    try:  # a spec stored before a field existed reads back with that field's default
        stored = JobSpec.model_validate(job.spec).model_dump(mode="json")
    except ValidationError:
        stored = job.spec
    if stored != spec.model_dump(mode="json"):
        raise ProblemError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different job spec",
            job_id=job.id,
        )
    return job


def cancel(session: Session, job: Job) -> None:
    """queued → cancelled at once; running → cancelling (the worker stops between steps)."""
    for _ in range(3):  # the state may move between our read and our guarded update
        if job.state in TERMINAL:
            raise ProblemError(
                409,
                "invalid_state_transition",
                f"job {job.id!r} is {job.state}; it can no longer be cancelled",
                state=job.state,
            )
        if job.state == JobState.CANCELLING:
            return
        target = JobState.CANCELLED if job.state == JobState.QUEUED else JobState.CANCELLING
        values: dict[str, Any] = {"finished_at": utcnow()} if target == JobState.CANCELLED else {}
        if repository.transition(session, job.id, target, **values):
            session.commit()
            return
        session.rollback()
        session.refresh(job)
    raise ProblemError(409, "concurrent_update", "the job changed state repeatedly; try again")


def delete(session: Session, job: Job) -> None:
    """Delete an ended job with its events and artifacts; their blobs go with the next sweep."""
    if not repository.delete_ended(session, job.id):
        session.rollback()
        raise ProblemError(
            409,
            "job_not_ended",
            f"job {job.id!r} is {job.state}; cancel it, then delete it once it has ended",
            state=job.state,
        )
    session.commit()
