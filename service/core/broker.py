"""Celery configuration shared by the API's client and the worker (DESIGN §3)."""

import os
from pathlib import Path
from typing import Any

from service.core.settings import Settings

VALIDATE_MODEL = "apoptosis.validate_model"
RUN_JOB = "apoptosis.run_job"
REDIS_SOCKET_SECONDS = 3.0
# the filesystem transport's exchanges: the queues' own and the workers' control box
EXCHANGES = ("cpu", "gpu", "celery.pidbox")


def celery_config(settings: Settings) -> dict[str, Any]:
    url = settings.resolved_broker_url()
    config: dict[str, Any] = {
        "broker_url": url,
        "task_acks_late": True,  # a job is acknowledged when done, not when received
        "task_reject_on_worker_lost": True,  # a killed worker's job goes back to the queue
        "worker_prefetch_multiplier": 1,  # one job at a time per process
        "task_default_queue": "cpu",
        "task_serializer": "json",
        "accept_content": ["json"],
        # the worker ends a job at job_soft_time_limit itself (failed: time_limit, between
        # steps); Celery's soft limit is the backstop for a step that runs on past it
        "task_soft_time_limit": settings.job_soft_time_limit + 60,
        "task_time_limit": settings.job_hard_time_limit,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
    if url.startswith("filesystem://"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for exchange in EXCHANGES:
            _empty_exchange_table(folder / "control" / f"{exchange}.exchange")
        config["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    elif url.startswith("redis"):
        config["broker_transport_options"] = {
            # Above the longest job, or Redis redelivers a late-acked job that is still running.
            "visibility_timeout": settings.job_hard_time_limit + 600,
            # A Redis that stops answering without closing its connections (hung, partitioned)
            # would hold a publish, an ack or the readiness check forever: kombu waits without
            # a socket timeout. The worker's BRPOP is not affected (it has its own).
            "socket_timeout": REDIS_SOCKET_SECONDS,
            "socket_connect_timeout": REDIS_SOCKET_SECONDS,
        }
    return config


def _empty_exchange_table(path: Path) -> None:
    """An exchange's binding table, `[]`, where there is none yet. kombu's filesystem transport
    creates it empty and locks it only after, so a second worker starting at the same moment
    can read it empty and die on the JSON (two `apoptosis worker`s started together, seen in
    the fault tests). Made whole before any process binds, and never over a table that is
    there: written aside, then linked into place (a link fails where the name exists)."""
    if path.exists():
        return
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    aside.write_text("[]")
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    finally:
        aside.unlink()
