"""Apoptosis pruning engine: second-order importance (OBA) and structured / unstructured pruning.

A pure library over `nn.Module`s: torch, torch-pruning and the standard library only.
"""

from worker.engine.allocation import ALLOCATIONS, allocation_names, register_allocation
from worker.engine.config import PruneConfig
from worker.engine.cost import Cost, measure
from worker.engine.errors import (
    EngineError,
    InvalidConfig,
    NumericalError,
    TargetUnreachable,
    UnsupportedModel,
)
from worker.engine.prune import prune, prune_, reachable_fraction
from worker.engine.results import PruneResult, StepRecord
from worker.engine.scores import METHODS, parameter_scores, register_scorer, registered_scorer
from worker.engine.structured import prunes_hidden_size

__all__ = [
    "ALLOCATIONS",
    "METHODS",
    "Cost",
    "EngineError",
    "InvalidConfig",
    "NumericalError",
    "PruneConfig",
    "PruneResult",
    "StepRecord",
    "TargetUnreachable",
    "UnsupportedModel",
    "allocation_names",
    "measure",
    "parameter_scores",
    "prune",
    "prune_",
    "prunes_hidden_size",
    "reachable_fraction",
    "register_allocation",
    "register_scorer",
    "registered_scorer",
]
