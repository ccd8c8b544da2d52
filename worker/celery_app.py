"""The Celery application of the worker (configuration shared with the API's client). The reaper
sends its re-queued tasks through this app, not through the API's client."""

import logging
import threading

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from service.broker import RUN_JOB, VALIDATE_MODEL, celery_config
from service.db import get_sessionmaker
from service.settings import get_settings
from service.workers import repository as workers

log = logging.getLogger("apoptosis.worker")
app = Celery("apoptosis", include=["worker.tasks"])
app.conf.update(celery_config(get_settings()))
_stop_reaper = threading.Event()


def reap_once() -> None:
    from worker.lifecycle import reap

    jobs, models = reap(get_settings())
    for job_id in jobs:
        log.warning("job %s: its worker went silent; queued again", job_id)
        app.send_task(RUN_JOB, args=[job_id], queue=get_settings().job_queue)
    for model_id in models:
        log.warning("model %s: still validating; validating again", model_id)
        app.send_task(VALIDATE_MODEL, args=[model_id], queue="cpu")


def _reaper_loop() -> None:
    interval = max(1.0, get_settings().stale_after_seconds / 3)
    while not _stop_reaper.wait(interval):
        try:
            reap_once()
        except Exception:  # the next round retries; the database is the source of truth
            log.exception("reaper round failed")


def beat_once(queues: str) -> None:
    """Tell /readyz this worker is alive (worker_heartbeat)."""
    from worker.lifecycle import WORKER_ID

    with get_sessionmaker()() as session:
        workers.beat(session, WORKER_ID, queues)
        session.commit()


def _heartbeat_loop(queues: str) -> None:
    while not _stop_reaper.wait(get_settings().heartbeat_seconds):
        try:
            beat_once(queues)
        except Exception:  # the next beat retries; /readyz tolerates a missed one
            log.exception("worker heartbeat failed")


def _retention_loop() -> None:
    from worker.retention import sweep_once

    while not _stop_reaper.wait(get_settings().sweep_seconds):
        try:
            sweep_once(get_settings())
        except Exception:  # the next round retries; a blob kept a while longer costs only disk
            log.exception("retention round failed")


def _webhook_loop() -> None:
    from worker.webhooks import serve

    serve(get_settings(), _stop_reaper)


@worker_ready.connect
def _start_reaper(sender: object = None, **_: object) -> None:
    from worker import heap, precision, threads

    threads.configure(get_settings())
    precision.allow_tf32(get_settings().allow_tf32)
    log.info("froze %d long-lived objects out of the collector's way", heap.freeze_imports())
    import transformers  # imported by then: its progress bars would fill the log, a line each

    transformers.utils.logging.disable_progress_bar()
    consumer = getattr(sender, "task_consumer", None)
    queues = ",".join(q.name for q in getattr(consumer, "queues", []))
    beat_once(queues)
    threading.Thread(target=_heartbeat_loop, args=(queues,), name="beat", daemon=True).start()
    reap_once()  # jobs orphaned while no worker ran (embedded broker messages can be lost)
    threading.Thread(target=_reaper_loop, name="reaper", daemon=True).start()
    threading.Thread(target=_retention_loop, name="retention", daemon=True).start()
    threading.Thread(target=_webhook_loop, name="webhooks", daemon=True).start()


@worker_shutdown.connect
def _stop(**_: object) -> None:
    _stop_reaper.set()
    from worker.lifecycle import WORKER_ID

    with get_sessionmaker()() as session:
        workers.forget(session, WORKER_ID)
        session.commit()
