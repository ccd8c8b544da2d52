"""What a model costs: multiply-accumulates of one forward pass and parameter counts.

MACs are counted at the ATen level (matmul, conv, attention kernels) with torch's own flop
formulas (`torch.utils.flop_counter.flop_registry`, those of `FlopCounterMode`), so functional
attention products and layers like transformers' `Conv1D` (an `addmm`) count too, on every
device.
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

from worker.engine.modes import eval_mode


def _grouped_mm_flops(
    a: torch.Tensor, b: torch.Tensor, *args: Any, out_val: torch.Tensor, **kwargs: Any
) -> int:
    """The grouped matrix product transformers runs routed experts with: each output element
    is one dot product over the shared dimension, except for a 2-D × 2-D product whose groups
    split that dimension (the output stacks one partial product a group)."""
    if a.dim() == b.dim() == 2:
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return 2 * out_val.numel() * a.shape[-1]


# torch's formulas, and two it lacks: the CPU kernel of scaled_dot_product_attention, which
# every transformers model runs on the CPU, costs what its CUDA siblings do (flash, efficient,
# cuDNN) — without it a job counted attention products on a GPU and not on a CPU; and the
# grouped product of mixtures of experts — without it routed experts cost nothing.
_FORMULAS = {
    **flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[
        torch.ops.aten._scaled_dot_product_flash_attention
    ],
    torch.ops.aten._grouped_mm: _grouped_mm_flops,
}
# Most formulas take shapes: torch wraps them (functools.wraps) in a converter that maps its
# arguments to shapes with pytree, which was 40% of a count. Those are called here with shapes
# read directly (a formula's operands are tensors, numbers and lists of numbers; its output a
# tensor or a tuple of them); the rest (registered raw) as torch calls them.
_BY_SHAPE = {op: getattr(formula, "__wrapped__", None) for op, formula in _FORMULAS.items()}


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
    counter = _FlopCounter()
    entering = register_module_forward_pre_hook(counter.enter)
    leaving = register_module_forward_hook(counter.leave, always_call=True)  # raising too
    try:
        # Never in inference mode, even when called in it: there composite ops such as
        # aten.linear reach the counter whole, and no flop formula knows them.
        with torch.inference_mode(False), torch.no_grad(), eval_mode(model), counter:
            run_forward(model, example_inputs)
    finally:
        entering.remove()
        leaving.remove()
    module_macs = {module: counter.by_module[module] // 2 for _, module in model.named_modules()}
    params = sum(p.numel() for p in model.parameters())
    return Cost(macs=counter.total // 2, params=params, module_macs=module_macs)


class _FlopCounter(TorchDispatchMode):
    """Flops of one forward pass, in all and per module (its calls' ops, children's included),
    from torch's flop formulas.

    `FlopCounterMode` counts the same ops with the same formulas, but its module tracker adds
    every op to each enclosing module as it goes: about 2 ms a count on a small BERT, twice
    the counting itself. A job counts after every removal round, so this adds each op to the
    innermost running call only, and a call's total to its caller's when it returns.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_module: Counter[nn.Module] = Counter()
        self.calls: list[list[Any]] = []  # [module, flops so far] of each running call
        # The module hooks are global, the dispatch mode is per thread: modules that other
        # threads run meanwhile are none of this count's business.
        self.thread = threading.get_ident()

    def enter(self, module: nn.Module, args: Any) -> None:
        if threading.get_ident() == self.thread:
            self.calls.append([module, 0])

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        _, flops = self.calls.pop()
        self.by_module[module] += flops
        if self.calls:
            self.calls[-1][1] += flops

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _FORMULAS.get(func._overloadpacket)
        if formula is not None:
            by_shape = _BY_SHAPE[func._overloadpacket]
            if by_shape is None:
                flops = formula(*args, **kwargs, out_val=out)
            else:
                shapes = [_shape(a) for a in args]
                flops = by_shape(
                    *shapes, **{k: _shape(v) for k, v in kwargs.items()}, out_shape=_shape(out)
                )
            self.total += flops
            if self.calls:
                self.calls[-1][1] += flops
        return out


def _shape(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (tuple, list)):
        return type(value)(_shape(v) for v in value)
    return value
