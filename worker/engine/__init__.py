"""Apoptosis pruning engine: second-order importance (OBA) and structured / unstructured pruning.

A pure library over `nn.Module`s: torch, torch-pruning and the standard library only.
"""

from worker.engine.config import PruneConfig
from worker.engine.cost import Cost, measure
from worker.engine.errors import EngineError, InvalidConfig, NumericalError, UnsupportedModel
from worker.engine.prune import PruneResult, prune
from worker.engine.scores import METHODS, parameter_scores
from worker.engine.structured import StepRecord

__all__ = [
    "METHODS",
    "Cost",
    "EngineError",
    "InvalidConfig",
    "NumericalError",
    "PruneConfig",
    "PruneResult",
    "StepRecord",
    "UnsupportedModel",
    "measure",
    "parameter_scores",
    "prune",
]
