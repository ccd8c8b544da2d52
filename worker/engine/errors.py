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


class TargetUnreachable(EngineError):
    """The target lies below what pruning can reach under the run's constraints."""

    code = "target_unreachable"

    def __init__(
        self,
        metric: str,
        target: float,
        reachable: float,
        per_layer: float | None = None,
        why: str | None = None,
    ) -> None:
        """`per_layer`: what per-layer widths would reach, when the run asked for widths a
        config states (uniform: an `hf` output) and they are what stands in the way; `why`:
        the widths the family's config cannot state, in words."""
        self.metric, self.target, self.reachable = metric, target, reachable
        self.per_layer, self.why = per_layer, why
        because = f" (with an hf output: {why})" if why else ""
        other = (
            f"; with an onnx, pt2 or safetensors output (per-layer widths) {per_layer:.4f} is "
            "reachable"
            if per_layer is not None and per_layer < reachable
            else ""
        )
        super().__init__(
            f"a {metric} target of {target:g} cannot be reached: under this job's constraints "
            f"(output format, floors, granularity) the model keeps at least {reachable:.4f} of "
            f"its {metric}{because}; ask for {reachable:.4f} or more, or loosen the "
            f"constraints{other}"
        )
