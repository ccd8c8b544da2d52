"""Liveness and readiness."""

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from service.core import queue
from service.core.db import SessionsDep, get_engine, ping
from service.core.orm import utcnow
from service.core.settings import get_settings
from service.core.store import ArtifactStore, get_store
from service.workers import repository as workers

router = APIRouter(tags=["health"])

# A dependency that hangs (a frozen Redis, a black-holed S3 endpoint) must not hang the probe:
# each check gets CHECK_SECONDS, then counts as failed. The checks run on threads of their own,
# at most one per check at a time (a probe finds a check still running and waits on that one),
# so hung checks neither pile up nor take the request thread pool's threads.
CHECK_SECONDS = 3.0
_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readyz")
_running: dict[str, "Future[bool]"] = {}
_running_lock = threading.Lock()


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
    """Every check at once, each answering within CHECK_SECONDS."""
    results = await asyncio.gather(
        _bounded("database", _database_ready),
        _bounded("broker", queue.broker_ready),  # looked up per call: tests replace it
        _bounded("store", _store_ready, request.app.state.store),
        _bounded("workers", _workers_ready, sessions),
    )
    checks = dict(zip(("database", "broker", "store", "workers"), results, strict=True))
    ready = all(checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )


async def _bounded(name: str, check: Callable[..., bool], *args: Any) -> bool:
    """`check(*args)`, or False if it has not answered within CHECK_SECONDS (it goes on in the
    background, and the next probe waits on it rather than starting another)."""
    with _running_lock:
        future = _running.get(name)
        if future is None or future.done():
            future = _executor.submit(check, *args)
            _running[name] = future
    try:
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), CHECK_SECONDS)
    except TimeoutError:
        return False


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
