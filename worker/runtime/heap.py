"""The worker's Python heap. torch, transformers and Torch-Pruning leave hundreds of thousands
of objects behind on import (262,000 at a worker's start, 380,000 once a BERT job has run),
alive as long as the process; every full garbage collection walked them all: 180 ms, every ten
or so small jobs, inside whatever stage allocated at that moment. Frozen
(`gc.freeze`, CPython's own answer to long-lived heaps) they are never walked again, and a full
collection of a job's objects takes about 2 ms.

Frozen objects are never collected, so freezing happens twice only: at start, after importing
what jobs run, and after the first job, which imports the rest (transformers loads a model's
module when a job first meets its architecture). A job's own objects are never frozen: they are
gone by then.
"""

import gc

_after_first_job = [False]


def freeze_imports() -> int:
    """Import what jobs run and freeze every object alive now; returns how many are frozen."""
    import worker.pipeline.steps  # noqa: F401 (the engine, torch, transformers, Torch-Pruning)

    return _freeze()


def job_done() -> None:
    """Freeze once more after the first job: the modules it imported stay for good."""
    if not _after_first_job[0]:
        _after_first_job[0] = True
        _freeze()


def _freeze() -> int:
    gc.collect()  # garbage is freed, not frozen
    gc.freeze()
    return gc.get_freeze_count()
