"""A model's validation states: every upload starts validating; the worker decides the rest."""

from enum import StrEnum


class ModelState(StrEnum):
    VALIDATING = "validating"
    READY = "ready"  # loaded, measured, and prunable: jobs may use it
    REJECTED = "rejected"  # the worker could not load or measure it; `error` says why
