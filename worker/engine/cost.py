"""What a model costs: multiply-accumulates of one forward pass and parameter counts.

MACs are counted at the ATen level (matmul, conv, attention kernels) with torch's own flop
formulas (`torch.utils.flop_counter.flop_registry`, those of `FlopCounterMode`), so functional
attention products and layers like transformers' `Conv1D` (an `addmm`) count too.
"""

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int
    module_macs: Mapping[nn.Module, int]  # leaf and composite modules alike, children included

    def metric(self, name: str) -> int:
        return self.macs if name == "macs" else self.params


def run_forward(model: nn.Module, inputs: Any) -> Any:
    """Call `model` on inputs given as one tensor, a sequence of positional ones or a dict."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, torch.Tensor):
        return model(*inputs)
    return model(inputs)


def measure(model: nn.Module, example_inputs: Any) -> Cost:
    """MACs of one forward pass on `example_inputs` (eval mode, no grad) and parameters."""
    training = model.training
    model.eval()
    counter = _FlopCounter()
    entering = register_module_forward_pre_hook(counter.enter)
    leaving = register_module_forward_hook(counter.leave)
    try:
        with torch.no_grad(), counter:
            run_forward(model, example_inputs)
    finally:
        entering.remove()
        leaving.remove()
        model.train(training)
    module_macs = _with_children(model, counter.flops)
    params = sum(p.numel() for p in model.parameters())
    return Cost(macs=sum(counter.flops.values()) // 2, params=params, module_macs=module_macs)


class _FlopCounter(TorchDispatchMode):
    """Flops per innermost running module, from torch's flop formulas.

    `FlopCounterMode` counts the same ops with the same formulas, but its module tracker adds
    every op to each enclosing module as it goes: about 2 ms a count on a small BERT, twice
    the counting itself. A job counts after every removal round, so this keeps one stack of
    running modules and sums the children into their parents once, at the end.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops: Counter[nn.Module | None] = Counter()
        self.running: list[nn.Module | None] = [None]  # None: outside every module
        # The module hooks are global, the dispatch mode is per thread: modules that other
        # threads run meanwhile are none of this count's business.
        self.thread = threading.get_ident()

    def enter(self, module: nn.Module, args: Any) -> None:
        if threading.get_ident() == self.thread:
            self.running.append(module)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == self.thread:
            self.running.pop()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops[self.running[-1]] += formula(*args, **kwargs, out_val=out)
        return out


def _with_children(model: nn.Module, flops: Mapping[nn.Module | None, int]) -> dict[nn.Module, int]:
    """Each module's MACs, its children's included (a module reached twice counts once)."""
    totals: dict[nn.Module, int] = {}

    def total(module: nn.Module) -> int:
        if module not in totals:
            totals[module] = flops.get(module, 0) + sum(total(c) for c in module.children())
        return totals[module]

    total(model)
    return {module: value // 2 for module, value in totals.items()}
