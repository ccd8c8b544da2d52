"""/v1/jobs: submit, list, read, cancel, follow (SSE), artifacts, report."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from service.artifacts.schemas import ArtifactOut
from service.auth import TenantDep
from service.db import get_sessionmaker
from service.deps import SessionDep
from service.jobs import report, repository, service
from service.jobs.schemas import JobOut, JobPage, JobSpec
from service.jobs.states import STATES, TERMINAL
from service.orm import Artifact, Job
from service.pagination import MAX_LIMIT, decode_cursor, encode_cursor
from service.problems import ProblemError, not_found

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
EVENT_POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0


def _owned(session: SessionDep, tenant_id: str, job_id: str) -> Job:
    job = repository.get(session, tenant_id, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.post("", status_code=202, response_model=JobOut)
def submit_job(
    spec: JobSpec,
    response: Response,
    tenant_id: TenantDep,
    session: SessionDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Job:
    job, created = service.create(session, tenant_id, spec, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.status_code = 200
    return job


@router.get("", response_model=JobPage)
def list_jobs(
    tenant_id: TenantDep,
    session: SessionDep,
    state: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> JobPage:
    if state is not None and state not in STATES:
        raise ProblemError(400, "invalid_state_filter", f"state must be one of {STATES}")
    rows = repository.page(session, tenant_id, state, limit + 1, decode_cursor(cursor))
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if more else None
    return JobPage(items=[JobOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
async def read_job(job_id: str, tenant_id: TenantDep, session: SessionDep) -> Job:
    # The endpoint clients poll: one primary-key read, on the event loop (no thread hop).
    return _owned(session, tenant_id, job_id)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(job_id: str, tenant_id: TenantDep, session: SessionDep) -> Job:
    job = _owned(session, tenant_id, job_id)
    service.cancel(session, job)
    session.refresh(job)
    return job


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut])
def list_artifacts(job_id: str, tenant_id: TenantDep, session: SessionDep) -> list[Artifact]:
    job = _owned(session, tenant_id, job_id)
    return list(
        session.scalars(
            select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.created_at)
        )
    )


@router.get("/{job_id}/report")
def job_report(
    job_id: str, tenant_id: TenantDep, session: SessionDep, format: Literal["json", "html"] = "json"
) -> Any:
    """The job's metrics as JSON, or (`?format=html`) as a page with before/after charts."""
    job = _owned(session, tenant_id, job_id)
    body = {
        "job_id": job.id,
        "state": job.state,
        "spec": job.spec,
        "result": job.result,
        "error": job.error,
    }
    return HTMLResponse(report.render(body)) if format == "html" else body


@router.get("/{job_id}/events")
async def job_events(
    job_id: str,
    tenant_id: TenantDep,
    session: SessionDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-Sent Events of the job's state and progress until it ends (resumable by id)."""
    _owned(session, tenant_id, job_id)
    start = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    return StreamingResponse(
        _stream(job_id, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(job_id: str, after: int) -> AsyncIterator[str]:
    idle = 0.0
    while True:
        events, state = await run_in_threadpool(_poll, job_id, after)
        for event_id, kind, data in events:
            after = event_id
            yield f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
        if events:
            idle = 0.0
            continue
        if state in TERMINAL:
            return
        await asyncio.sleep(EVENT_POLL_SECONDS)
        idle += EVENT_POLL_SECONDS
        if idle >= KEEPALIVE_SECONDS:
            idle = 0.0
            yield ": keep-alive\n\n"


def _poll(job_id: str, after: int) -> tuple[list[tuple[int, str, dict[str, Any]]], str | None]:
    # State first: an event committed after this read is still read below, so the stream
    # never ends (on a terminal state) before sending the final events.
    with get_sessionmaker()() as session:
        state = session.scalar(select(Job.state).where(Job.id == job_id))
        events = [(e.id, e.kind, e.data) for e in repository.events_after(session, job_id, after)]
    return events, state
