"""Scorers and allocation rules that installed packages declare (service/jobs/vocabulary.py).

Each entry point names a scorer (`worker.engine.scores.Scorer`, with an optional `needs_data`
attribute, True by default) or an allocation rule (`worker.engine.allocation.AllocationRule`),
registered with the engine under the entry point's name before a job runs."""

from functools import cache
from importlib.metadata import entry_points

from service.jobs.vocabulary import ALLOCATIONS, SCORERS
from worker.engine import register_allocation, register_scorer


@cache
def register_plugins() -> None:
    """Register every plugin once per process (a job names them by their entry point)."""
    for point in entry_points(group=SCORERS):
        scorer = point.load()
        register_scorer(point.name, scorer, needs_data=getattr(scorer, "needs_data", True))
    for point in entry_points(group=ALLOCATIONS):
        register_allocation(point.name, point.load())
