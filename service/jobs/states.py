"""The job state machine (DESIGN §3). Terminal states never change."""

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


STATES = tuple(JobState)
LEASED = (JobState.RUNNING, JobState.CANCELLING)  # a worker holds the job's lease
TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# to-state -> the states it may be reached from
ALLOWED_FROM: dict[JobState, frozenset[JobState]] = {
    JobState.RUNNING: frozenset({JobState.QUEUED}),  # a worker claims the job
    JobState.QUEUED: frozenset({JobState.RUNNING}),  # the reaper returns a silent worker's job
    JobState.CANCELLING: frozenset({JobState.RUNNING}),  # cooperative while running
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.CANCELLING}),
    # finishing first wins over a late cancel
    JobState.SUCCEEDED: frozenset({JobState.RUNNING, JobState.CANCELLING}),
    JobState.FAILED: frozenset({JobState.RUNNING, JobState.CANCELLING}),
}
