"""How many threads torch may use in this worker: the cores the process may run on, shared
with the other workers of the host. More threads than cores make torch's spinning threads fight
(a small job took 13× longer with four other processes on two cores)."""

import logging
import os

import torch

from service.settings import Settings

log = logging.getLogger("apoptosis.worker")


def cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset set)."""
    return len(os.sched_getaffinity(0))


def threads_for(settings: Settings) -> int:
    if settings.worker_threads:
        return settings.worker_threads
    return max(1, cores() // settings.workers_per_host)


def configure(settings: Settings) -> int:
    count = threads_for(settings)
    torch.set_num_threads(count)
    log.info(
        "torch uses %d threads (%d cores, %d workers on this host)",
        count,
        cores(),
        settings.workers_per_host,
    )
    return count
