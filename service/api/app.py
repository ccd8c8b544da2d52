"""The FastAPI application."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.api import health, metrics
from service.api.body_limit import BodyLimitMiddleware
from service.api.dashboard import router as dashboard
from service.artifacts.router import router as artifacts_router
from service.core import problems
from service.core.settings import get_settings
from service.core.store import ArtifactStore
from service.datasets.router import router as datasets_router
from service.jobs.router import router as jobs_router
from service.models.router import router as models_router
from service.uploads.multipart import sweep_spool
from service.webhooks.router import router as webhooks_router

log = logging.getLogger("apoptosis.api")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    spool = get_settings().home / "tmp"
    if swept := await run_in_threadpool(sweep_spool, spool):
        log.warning("removed %d spool files of uploads cut short", swept)
    yield


def create_app(
    sessions: sessionmaker[Session] | None = None, store: ArtifactStore | None = None
) -> FastAPI:
    """The API. Its session factory and artifact store can be passed in (tests do); by default
    they are the ones the settings configure, made when first needed."""
    app = FastAPI(
        lifespan=_lifespan,
        title="Apoptosis",
        version="0.1.0",
        description="Hessian-based model pruning (Optimal Brain Apoptosis) as a service.",
    )
    app.state.sessions, app.state.store = sessions, store
    problems.install(app)
    # The upload routes are the POSTs at these prefixes: their bodies get the upload cap.
    app.add_middleware(
        BodyLimitMiddleware, upload_paths=(models_router.prefix, datasets_router.prefix)
    )
    metrics.install(app)  # outermost: it counts what the body limit refuses too
    for router in (
        health.router,
        metrics.router,
        models_router,
        datasets_router,
        jobs_router,
        artifacts_router,
        webhooks_router,
        dashboard.router,
    ):
        app.include_router(router)
    app.mount("/dashboard/static", dashboard.static, name="dashboard")
    return app
