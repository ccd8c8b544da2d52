"""Apoptosis pruning engine: second-order importance (OBA) and structured / unstructured pruning.

A pure library over `nn.Module`s: torch, torch-pruning and the standard library only.
"""

from worker.engine.errors import EngineError, InvalidConfig, NumericalError, UnsupportedModel
from worker.engine.scores import METHODS, parameter_scores

__all__ = [
    "METHODS",
    "EngineError",
    "InvalidConfig",
    "NumericalError",
    "UnsupportedModel",
    "parameter_scores",
]
