"""Liveness and readiness."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service import queue
from service.db import get_engine, ping
from service.store import ArtifactStore, get_store

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: answered on the event loop, so it says whether the loop is free."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    checks = {
        "database": await run_in_threadpool(_database_ready),
        "broker": await run_in_threadpool(queue.broker_ready),
        "store": await run_in_threadpool(_store_ready, request.app.state.store),
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


def _store_ready(given: ArtifactStore | None) -> bool:
    try:
        (given if given is not None else get_store()).exists("sha256/00/" + "0" * 64)
        return True
    except Exception:  # any store error means "not ready"
        return False
