"""The FastAPI application."""

from fastapi import FastAPI

from service import health, metrics, problems
from service.artifacts.router import router as artifacts_router
from service.datasets.router import router as datasets_router
from service.jobs.router import router as jobs_router
from service.models.router import router as models_router


def create_app() -> FastAPI:
    app = FastAPI(
        title="Apoptosis",
        version="0.1.0",
        description="Hessian-based model pruning (Optimal Brain Apoptosis) as a service.",
    )
    problems.install(app)
    metrics.install(app)
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
