"""The Celery application of the worker (configuration shared with the API's client). The reaper
sends its re-queued tasks through this app, not through the API's client."""

import logging
import threading

from celery import Celery, Task
from celery.signals import worker_ready, worker_shutdown
from celery.worker.request import Request
from kombu.transport import virtual

from service.core.broker import RUN_JOB, VALIDATE_MODEL, celery_config
from service.core.db import get_sessionmaker
from service.core.settings import get_settings
from service.workers import repository as workers

log = logging.getLogger("apoptosis.worker")


class SlotFreeingRequest(Request):
    """A task's message whose acknowledgement frees the worker's prefetch slot even when the
    broker did not answer it.

    kombu's virtual transports (Redis, filesystem, SQL) count unacknowledged deliveries in the
    channel's QoS, and the worker asks for no message while that count is at its prefetch limit
    (one: solo pool, multiplier 1). Redis's QoS.ack writes to Redis before it forgets the
    delivery, so an ack that times out (Redis hung) leaves the slot taken for good, and Celery
    only logs "Couldn't ack" (Message.ack_log_error), as it does for a reject. No Celery or
    kombu setting covers this, so the slot is freed here, as the rest of kombu's ack would
    have. If Redis never applied the ack, the message stays in its unacked set and comes back
    after the visibility timeout; its job has ended, so the redelivery claims nothing
    (lifecycle.run_job: the claim is a guarded queued → running update)."""

    def acknowledge(self) -> None:
        if not self.acknowledged:
            super().acknowledge()
            self._forget_unanswered()

    def reject(self, requeue: bool = False) -> None:
        if not self.acknowledged:
            super().reject(requeue)
            self._forget_unanswered()

    def _forget_unanswered(self) -> None:
        message = self.message
        qos = getattr(message.channel, "qos", None)
        if not message.acknowledged and isinstance(qos, virtual.QoS):
            virtual.QoS.ack(qos, message.delivery_tag)


class JobTask(Task):
    Request = SlotFreeingRequest


app = Celery("apoptosis", include=["worker.runtime.tasks"], task_cls=JobTask)
app.conf.update(celery_config(get_settings()))
_stop_reaper = threading.Event()


def reap_once() -> None:
    from worker.runtime.lifecycle import reap

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
    from worker.runtime.lifecycle import WORKER_ID

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
    from worker.chores.retention import sweep_once

    while not _stop_reaper.wait(get_settings().sweep_seconds):
        try:
            sweep_once(get_settings())
        except Exception:  # the next round retries; a blob kept a while longer costs only disk
            log.exception("retention round failed")


def _webhook_loop() -> None:
    from worker.chores.webhooks import serve

    serve(get_settings(), _stop_reaper)


@worker_ready.connect
def _start_reaper(sender: object = None, **_: object) -> None:
    from worker.pipeline import precision
    from worker.runtime import heap, threads

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
    from worker.runtime.lifecycle import WORKER_ID

    with get_sessionmaker()() as session:
        workers.forget(session, WORKER_ID)
        session.commit()
