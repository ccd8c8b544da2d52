"""The Celery application of the worker (configuration shared with the API's client). The reaper
sends its re-queued tasks through this app, not through the API's client."""

import logging
import threading

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from service.broker import RUN_JOB, VALIDATE_MODEL, celery_config
from service.settings import get_settings

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


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    reap_once()  # jobs orphaned while no worker ran (embedded broker messages can be lost)
    threading.Thread(target=_reaper_loop, name="reaper", daemon=True).start()


@worker_shutdown.connect
def _stop(**_: object) -> None:
    _stop_reaper.set()
