"""Building Torch-Pruning's dependency graph for any model, Hugging Face ones included."""

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from worker.engine.architectures import _tensors
from worker.engine.cost import run_forward
from worker.engine.errors import UnsupportedModel
from worker.engine.groups import is_conv1d_transposed


class Conv1DPruner(tp.pruner.function.BasePruningFunc):
    """Pruning functions for transformers' `Conv1D` (weight stored (in, out), as in GPT-2)."""

    def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.nf)) - set(idxs))
        layer.weight = nn.Parameter(layer.weight.data[:, keep].clone())
        layer.bias = nn.Parameter(layer.bias.data[keep].clone())
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.nx)) - set(idxs))
        layer.weight = nn.Parameter(layer.weight.data[keep, :].clone())
        layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: Any) -> int:
        return int(layer.nf)

    def get_in_channels(self, layer: Any) -> int:
        return int(layer.nx)


def _tensor_outputs(model: nn.Module, inputs: Any) -> tuple[Tensor, ...]:
    # Torch-Pruning traces from tensors; model outputs may be dicts holding caches and the like.
    return tuple(t for t in _tensors(run_forward(model, inputs)) if t.requires_grad)


def build_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    customized = {type(m): Conv1DPruner() for m in model.modules() if is_conv1d_transposed(m)}
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            # it reports unwrapped parameters (position embeddings, layer scales) it then handles
            warnings.simplefilter("ignore", UserWarning)
            return tp.DependencyGraph().build_dependency(
                model,
                example_inputs=example_inputs,
                forward_fn=_tensor_outputs,
                customized_pruners=customized or None,
                verbose=False,
            )
    except Exception as error:  # tracing failures come as assorted exception types
        raise UnsupportedModel(f"cannot trace the model's channel dependencies: {error}") from error
