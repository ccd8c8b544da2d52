"""How many threads torch may use in this worker: the cores the process may run on, shared
with the other workers of the host. More threads than cores make torch's spinning threads fight
(a small job took 13× longer with four other processes on two cores).

transformers loads a checkpoint's tensors on a pool of its own, min(4, cores) threads beside
torch's. On two cores loading one after the other was faster for every model measured (median
of 15 loads: the quickstart BERT 21.5 → 18.1 ms, all-MiniLM-L6-v2 57.7 → 36.3 ms, a random
BERT-base 64.5 → 50.9 ms), so a worker with fewer threads than that pool loads sequentially."""

import logging
import os

import torch

from service.core.settings import Settings

log = logging.getLogger("apoptosis.worker")

LOADER_POOL = 4  # transformers' loading threads (core_model_loading.GLOBAL_WORKERS), at most
SEQUENTIAL_LOADING = "HF_DEACTIVATE_ASYNC_LOAD"


def cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset set)."""
    return len(os.sched_getaffinity(0))


def threads_for(settings: Settings) -> int:
    if settings.worker_threads:
        return settings.worker_threads
    return max(1, cores() // settings.workers_per_host)


def configure(settings: Settings) -> int:
    count = threads_for(settings)
    use(count)
    log.info(
        "torch uses %d threads (%d cores, %d workers on this host)",
        count,
        cores(),
        settings.workers_per_host,
    )
    return count


def use(count: int) -> None:
    """Run torch on `count` threads, and load checkpoints on no pool of threads beside them
    when they are fewer than the pool would be (unless the operator chose otherwise)."""
    torch.set_num_threads(count)
    if count < LOADER_POOL:
        os.environ.setdefault(SEQUENTIAL_LOADING, "1")
