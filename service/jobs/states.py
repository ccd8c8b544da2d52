"""The job state machine (DESIGN §3). Terminal states never change."""

QUEUED, RUNNING, CANCELLING = "queued", "running", "cancelling"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# to-state -> the states it may be reached from
ALLOWED_FROM: dict[str, frozenset[str]] = {
    RUNNING: frozenset({QUEUED}),  # a worker claims the job
    QUEUED: frozenset({RUNNING}),  # the reaper returns a job whose worker went silent
    CANCELLING: frozenset({RUNNING}),  # cancellation is cooperative while running
    CANCELLED: frozenset({QUEUED, CANCELLING}),
    SUCCEEDED: frozenset({RUNNING, CANCELLING}),  # finishing first wins over a late cancel
    FAILED: frozenset({RUNNING, CANCELLING}),
}


def can_transition(current: str, target: str) -> bool:
    return current in ALLOWED_FROM.get(target, frozenset())
