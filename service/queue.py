"""The API's side of the queue: send tasks by name, never importing the worker."""

from functools import lru_cache

from celery import Celery

from service.broker import RUN_JOB, VALIDATE_MODEL, celery_config
from service.settings import get_settings


@lru_cache
def client() -> Celery:
    app = Celery("apoptosis-api")
    app.conf.update(celery_config(get_settings()))
    return app


def enqueue_job(job_id: str, queue: str) -> None:
    """Called after the job row is committed: a worker that gets the id finds the row."""
    client().send_task(RUN_JOB, args=[job_id], queue=queue)


def enqueue_validation(model_id: str) -> None:
    client().send_task(VALIDATE_MODEL, args=[model_id], queue="cpu")


def broker_ready() -> bool:
    try:
        with client().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:  # any transport error means "not ready"
        return False
