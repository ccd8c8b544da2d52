"""Liveness and readiness."""

from datetime import timedelta

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service import queue
from service.db import SessionsDep, get_engine, ping
from service.orm import utcnow
from service.settings import get_settings
from service.store import ArtifactStore, get_store
from service.workers import repository as workers

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: answered on the event loop, so it says whether the loop is free."""
    return {"status": "ok"}


class Readiness(BaseModel):
    status: str  # ready | not_ready
    checks: dict[str, bool]  # database, broker, store, workers


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "a check failed; `checks` says which"}},
)
async def readyz(request: Request, sessions: SessionsDep) -> JSONResponse:
    checks = {
        "database": await run_in_threadpool(_database_ready),
        "broker": await run_in_threadpool(queue.broker_ready),
        "store": await run_in_threadpool(_store_ready, request.app.state.store),
        "workers": await run_in_threadpool(_workers_ready, sessions),
    }
    ready = all(checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )


def _database_ready() -> bool:
    try:
        ping(get_engine())
        return True
    except Exception:  # any driver error means "not ready"
        return False


def _workers_ready(sessions: sessionmaker[Session]) -> bool:
    """At least one worker beat within the stale time (jobs would wait forever otherwise)."""
    cutoff = utcnow() - timedelta(seconds=get_settings().stale_after_seconds)
    try:
        with sessions() as session:
            return workers.alive_since(session, cutoff) > 0
    except Exception:  # the database check says why
        return False


def _store_ready(given: ArtifactStore | None) -> bool:
    try:
        (given if given is not None else get_store()).exists("sha256/00/" + "0" * 64)
        return True
    except Exception:  # any store error means "not ready"
        return False
