"""The API's side of the queue: send tasks by name, never importing the worker."""

from functools import lru_cache

from celery import Celery

from service.core.broker import RUN_JOB, VALIDATE_MODEL, celery_config
from service.core.settings import get_settings

# A request that sends a task answers within seconds even when the broker hangs (each try
# waits at most the broker's socket timeout): one retry covers a connection the broker dropped.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}


@lru_cache
def client() -> Celery:
    app = Celery("apoptosis-api")
    app.conf.update(celery_config(get_settings()))
    app.conf.task_publish_retry_policy = PUBLISH_RETRY_POLICY
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
