"""The names a job spec may give its scorer (`method`) and its allocation rule
(`normalisation`).

The engine owns what they do (`register_scorer`, `register_allocation`). A plugin package adds
one with one line of its own metadata, an entry point in the `apoptosis.scorers` or
`apoptosis.allocations` group (`my_scorer = "my_package.scores:my_scorer"`): the worker loads
and registers it (`worker/pipeline/plugins.py`), while the API and the CLI read only its name, so
they import neither torch nor the plugin. A test holds the built-ins equal to the engine's own
registrations (tests/worker/test_plugins.py).
"""

from functools import cache
from importlib.metadata import entry_points

SCORERS = "apoptosis.scorers"
ALLOCATIONS = "apoptosis.allocations"
BUILT_IN_METHODS = ("oba", "oba_full", "taylor", "obd", "magnitude", "random")
BUILT_IN_ALLOCATIONS = ("max", "lamp", "lamp_weights", "lamp_rank_sum")


@cache
def plugin_names(group: str) -> tuple[str, ...]:
    """The names installed packages declare in `group`, sorted (read once per process)."""
    return tuple(sorted({point.name for point in entry_points(group=group)}))


def methods() -> tuple[str, ...]:
    """Every scoring method a job may name: the built-ins, then the plugins'."""
    return _with_plugins(BUILT_IN_METHODS, SCORERS)


def allocations() -> tuple[str, ...]:
    """Every allocation rule a job may name: the built-ins, then the plugins'."""
    return _with_plugins(BUILT_IN_ALLOCATIONS, ALLOCATIONS)


def _with_plugins(built_in: tuple[str, ...], group: str) -> tuple[str, ...]:
    return built_in + tuple(name for name in plugin_names(group) if name not in built_in)
