"""The engine's own error hierarchy; the worker maps these to a job's `error` JSON."""


class EngineError(Exception):
    """Base class for every error the engine raises on purpose."""

    code = "engine_error"


class InvalidConfig(EngineError):
    """The pruning configuration or the inputs do not make sense together."""

    code = "invalid_config"


class UnsupportedModel(EngineError):
    """The model has a structure the engine cannot score or prune."""

    code = "unsupported_model"


class NumericalError(EngineError):
    """Scores or losses became non-finite."""

    code = "numerical_error"
