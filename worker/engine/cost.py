"""What a model costs: multiply-accumulates of one forward pass and parameter counts.

MACs are counted at the ATen level (matmul, conv, attention kernels) by torch's FlopCounterMode,
so functional attention products and layers like transformers' `Conv1D` (an `addmm`) count too.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run_forward(model, example_inputs)
    finally:
        model.train(training)
    prefix = type(model).__name__
    by_name = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    module_macs = {
        module: by_name.get(f"{prefix}.{name}" if name else prefix, 0) // 2
        for name, module in model.named_modules()
    }
    params = sum(p.numel() for p in model.parameters())
    return Cost(macs=counter.get_total_flops() // 2, params=params, module_macs=module_macs)
