"""The FastAPI application."""

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from service import health, metrics, problems
from service.artifacts.router import router as artifacts_router
from service.body_limit import BodyLimitMiddleware
from service.datasets.router import router as datasets_router
from service.jobs.router import router as jobs_router
from service.models.router import router as models_router
from service.store import ArtifactStore


def create_app(
    sessions: sessionmaker[Session] | None = None, store: ArtifactStore | None = None
) -> FastAPI:
    """The API. Its session factory and artifact store can be passed in (tests do); by default
    they are the ones the settings configure, made when first needed."""
    app = FastAPI(
        title="Apoptosis",
        version="0.1.0",
        description="Hessian-based model pruning (Optimal Brain Apoptosis) as a service.",
    )
    app.state.sessions, app.state.store = sessions, store
    problems.install(app)
    app.add_middleware(BodyLimitMiddleware)
    metrics.install(app)  # outermost: it counts what the body limit refuses too
    for router in (
        health.router,
        metrics.router,
        models_router,
        datasets_router,
        jobs_router,
        artifacts_router,
    ):
        app.include_router(router)
    return app
