"""Thin Celery tasks: each takes an id and hands it to the lifecycle (`lifecycle.py`)."""

from service.core.broker import RUN_JOB, VALIDATE_MODEL
from worker.runtime import heap, lifecycle
from worker.runtime.celery_app import app


@app.task(name=VALIDATE_MODEL)
def validate_model(model_id: str) -> None:
    lifecycle.validate_model(model_id)


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    try:
        lifecycle.run_job(job_id)
    finally:
        heap.job_done()
