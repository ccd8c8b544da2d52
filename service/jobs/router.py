"""/v1/jobs: submit, list, read, cancel, delete, follow (SSE), artifacts, report."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import HTMLResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.artifacts import repository as artifacts
from service.artifacts.schemas import ArtifactOut
from service.core.db import SessionsDep
from service.core.orm import Artifact, Job
from service.core.pagination import MAX_LIMIT
from service.core.problems import ProblemError, found, responses
from service.jobs import report, repository, service
from service.jobs.schemas import JobOut, JobPage, JobReport, JobSpec
from service.jobs.states import STATES, TERMINAL
from service.tenants import repository as tenants
from service.tenants.auth import TenantDep

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], responses=responses(400, 401, 404, 409, 413, 422, 429, 503)
)
EVENT_POLL_SECONDS = 0.5
# 200 is JSON (FastAPI's default content) or, with `?format=html`, the page
_REPORT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/html": {"schema": {"type": "string"}}}},
}
REPORT_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    "X-Content-Type-Options": "nosniff",
}


def _owned(session: Session, tenant_id: str, job_id: str) -> Job:
    return found(tenants.owned(session, Job, tenant_id, job_id), "job", job_id)


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses={200: {"model": JobOut, "description": "the job this Idempotency-Key made"}},
)
def submit_job(
    spec: JobSpec,
    response: Response,
    tenant_id: TenantDep,
    sessions: SessionsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Job:
    with sessions() as session:
        job, created = service.create(session, tenant_id, spec, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.status_code = 200
    return job


@router.get("", response_model=JobPage)
def list_jobs(
    tenant_id: TenantDep,
    sessions: SessionsDep,
    state: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> JobPage:
    if state is not None and state not in STATES:
        raise ProblemError(400, "invalid_state_filter", f"state must be one of {STATES}")
    where = [Job.state == state] if state is not None else []
    with sessions() as session:
        rows, next_cursor = tenants.page(session, Job, tenant_id, limit, cursor, *where)
    return JobPage(items=[JobOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def read_job(job_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> Job:
    with sessions() as session:
        return _owned(session, tenant_id, job_id)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(job_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> Job:
    with sessions() as session:
        job = _owned(session, tenant_id, job_id)
        service.cancel(session, job)
        session.refresh(job)
        return job


@router.delete("/{job_id}", status_code=204)
def delete_job(job_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> Response:
    with sessions() as session:
        service.delete(session, _owned(session, tenant_id, job_id))
    return Response(status_code=204)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut])
def list_artifacts(job_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> list[Artifact]:
    with sessions() as session:
        return list(artifacts.of_job(session, _owned(session, tenant_id, job_id).id))


@router.get("/{job_id}/report", response_model=JobReport, responses=_REPORT)
def job_report(
    job_id: str,
    tenant_id: TenantDep,
    sessions: SessionsDep,
    format: Literal["json", "html"] = "json",
) -> Any:
    """The job's metrics as JSON, or (`?format=html`) as a page with before/after charts."""
    with sessions() as session:
        job = _owned(session, tenant_id, job_id)
    body = JobReport.model_validate(
        {
            "job_id": job.id,
            "state": job.state,
            "spec": job.spec,
            "result": job.result,
            "error": job.error,
        }
    )
    if format != "html":
        return body
    # The page holds user-named values (escaped): it runs no script and loads nothing.
    return HTMLResponse(report.render(body), headers=REPORT_HEADERS)


def _followed_job(job_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> str:
    """The id of a job the caller owns, checked with a session closed before the stream starts."""
    with sessions() as session:
        return _owned(session, tenant_id, job_id).id


@router.get("/{job_id}/events", response_class=EventSourceResponse)
async def job_events(
    job_id: Annotated[str, Depends(_followed_job)],
    sessions: SessionsDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events of the job's state and progress until it ends (resumable by id).

    Each poll opens a session in the thread pool and closes it: an open stream holds no database
    connection between polls. FastAPI sends keep-alive comments while nothing happens.
    """
    given = last_event_id or ""
    # else start over; isdecimal, not isdigit: int() refuses the '¹²³' of a (latin-1) header
    after = int(given) if given.isdecimal() and len(given) <= 18 else 0
    while True:
        events, state = await run_in_threadpool(_poll, sessions, job_id, after)
        for event_id, kind, data in events:
            after = event_id
            yield ServerSentEvent(raw_data=json.dumps(data), event=kind, id=str(event_id))
        if events:
            continue
        if state in TERMINAL:
            return
        await asyncio.sleep(EVENT_POLL_SECONDS)


def _poll(
    sessions: sessionmaker[Session], job_id: str, after: int
) -> tuple[list[tuple[int, str, dict[str, Any]]], str | None]:
    # State first: an event committed after this read is still read below, so the stream
    # never ends (on a terminal state) before sending the final events.
    with sessions() as session:
        state = repository.state_of(session, job_id)
        events = [(e.id, e.kind, e.data) for e in repository.events_after(session, job_id, after)]
    return events, state
