"""Depth pruning: removing whole transformer blocks, scored by the second-order loss change.

Block i maps h ↦ h + f_i(h). Put a gate α_i on its contribution, h ↦ h + α_i·f_i(h), so α = 1 is
the model and α_i = 0 removes the block. The second-order Taylor expansion of the loss in α_i
around 1 gives the loss change of removing block i alone (δα_i = −1):

    ΔL_i ≈ −∂L/∂α_i + ½ ∂²L/∂α_i²

exact first and second derivatives (one gradient, then one Hessian-vector product per block along
e_i), averaged over calibration batches. It is the depth analogue of OBD's ½H_ii θ² with the
first-order term kept, and, unlike ShortGPT's cosine "block influence", it sees the loss: with a
distillation loss (zero gradient at the start) it reduces to the curvature term and still ranks.
Blocks are removed one at a time, re-scored after each removal, lowest ΔL first.

ΔL is what removing a block costs *now*. The blocks that cost least now are not always the ones
that recover best: on the tiny LLM (docs/benchmarks/tiny-llm.md) ΔL takes the last two blocks
and recovers to 6.10 perplexity after distillation where ShortGPT's block influence (Men et al.
2024: 1 − cos(block input, block output), mean over tokens; lowest goes first) takes the middle
two and recovers to 5.68. `block_score="influence"` chooses by it, and a search judges both
after a short recovery (`worker/pipeline/search.py`).
"""

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from worker.engine.blocks import LAYER_COUNT_ATTRIBUTES, remove_blocks_
from worker.engine.cost import Cost, measure
from worker.engine.errors import InvalidConfig, UnsupportedModel
from worker.engine.modes import eval_mode
from worker.engine.results import StepRecord
from worker.engine.scores import LossFn


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of a Hugging Face transformer's blocks: as long as the config's layer count,
    all of one type. None for models whose config states no layer count."""
    config = getattr(model, "config", None)
    count = next(
        (
            getattr(config, a)
            for a in LAYER_COUNT_ATTRIBUTES
            if isinstance(getattr(config, a, None), int)
        ),
        None,
    )
    if not count:
        return None
    for name, module in model.named_modules():
        same_type = len({type(block) for block in module.children()}) == 1
        if isinstance(module, nn.ModuleList) and len(module) == count and same_type:
            return name, module
    return None


def block_scores(
    model: nn.Module, blocks: nn.ModuleList, batches: list[Any], loss_fn: LossFn, method: str
) -> Tensor:
    """Predicted loss change of removing each block (float64, one per block); lower goes first.

    `magnitude` ranks by the blocks' L1 weight norm and `random` at random (data-free controls);
    every data-driven method uses the second-order estimate ΔL_i of the module docstring.
    """
    if method == "magnitude":
        return torch.tensor(
            [float(sum(p.detach().abs().sum() for p in b.parameters())) for b in blocks],
            dtype=torch.float64,
        )
    if method == "random":
        return torch.rand(len(blocks), dtype=torch.float64)
    if not batches:
        raise InvalidConfig(f"method {method!r} needs at least one calibration batch")
    reference = next(blocks.parameters())
    gates = torch.ones(len(blocks), dtype=reference.dtype, device=reference.device)
    gates.requires_grad_(True)
    total = torch.zeros(len(blocks), dtype=torch.float64)
    with _gated(blocks, gates), eval_mode(model), sdpa_kernel(SDPBackend.MATH):
        for batch in batches:
            (gradient,) = torch.autograd.grad(loss_fn(model, batch), gates, create_graph=True)
            curvature = torch.stack(
                [_second_derivative(gradient[i], gates, i) for i in range(len(blocks))]
            )
            total += (-gradient.detach() + 0.5 * curvature).double().cpu()
    return total / len(batches)


def block_influence(
    model: nn.Module, blocks: nn.ModuleList, batches: list[Any], loss_fn: LossFn
) -> Tensor:
    """ShortGPT's block influence of each block (float64): 1 − cos(input, output) per token,
    averaged over the calibration tokens (those the attention mask keeps, where the batch has
    one). A block that barely turns the residual stream goes first. The forward passes are the
    loss's (it knows what of a batch the model takes); the loss itself is not used."""
    if not batches:
        raise InvalidConfig("block_score 'influence' needs at least one calibration batch")
    total = torch.zeros(len(blocks), dtype=torch.float64)
    weight = torch.zeros((), dtype=torch.float64)
    taken: list[Tensor] = []

    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        out = output if isinstance(output, Tensor) else output[0]
        cosine = nn.functional.cosine_similarity(hidden.double(), out.double(), dim=-1)
        taken.append(1 - cosine)

    handles = [block.register_forward_hook(hook, with_kwargs=True) for block in blocks]
    try:
        with torch.no_grad(), eval_mode(model):
            for batch in batches:
                taken.clear()
                loss_fn(model, batch)
                mask = _token_mask(batch, taken[0])
                total += torch.stack([(t * mask).sum() for t in taken]).cpu()
                weight += mask.sum().cpu()
    finally:
        for handle in handles:
            handle.remove()
    return total / weight


def _token_mask(batch: Any, influence: Tensor) -> Tensor:
    """1 for the tokens an attention mask keeps (all, without one), shaped as `influence`."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, Tensor) and mask.shape == influence.shape:
        return mask.to(influence)
    return torch.ones_like(influence)


def _second_derivative(first: Tensor, gates: Tensor, index: int) -> Tensor:
    if not first.requires_grad:  # the loss is linear in this gate
        return torch.zeros((), dtype=gates.dtype, device=gates.device)
    (row,) = torch.autograd.grad(first, gates, retain_graph=True, allow_unused=True)
    return row[index].detach() if row is not None else torch.zeros((), dtype=gates.dtype)


@contextmanager
def _gated(blocks: nn.ModuleList, gates: Tensor) -> Iterator[None]:
    """Blocks compute h + α_i·(block(h) − h) while the context is open."""

    def hook(index: int) -> Any:
        def gate(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output if isinstance(output, Tensor) else output[0]
            gated = hidden + gates[index] * (out - hidden)
            return gated if isinstance(output, Tensor) else (gated, *output[1:])

        return gate

    handles = [
        block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _overshoots(cost: Cost, block: nn.Module, metric: str, goal: float) -> bool:
    """Whether removing `block` lands further below `goal` than the model now is above it."""
    now = cost.metric(metric)
    saving = cost.module_macs.get(block, 0) if metric == "macs" else _params(block)
    after = now - saving
    return after < goal and (after <= 0 or math.log(goal / after) > math.log(now / goal))


def _params(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def floor_blocks(count: int, layer_floor: float) -> int:
    return max(1, math.ceil(layer_floor * count))


def prune_blocks_(
    model: nn.Module,
    example_inputs: Any,
    calibration: list[Any],
    loss_fn: LossFn,
    method: str,
    layer_floor: float,
    goal: float,
    metric: str,
    on_step: Callable[[StepRecord], None] | None = None,
    nearest: bool = False,
    block_score: str = "loss",
) -> tuple[list[StepRecord], str, list[int]]:
    """Remove blocks one at a time, lowest score first (the predicted ΔL, or the block
    influence with `block_score="influence"`), re-scored after each, until `metric` ≤ `goal`
    or the floor. Returns a record per removal, the blocks' container name and the removed
    positions.

    `nearest` (depth before widths): stop short of `goal` when the next removal would land
    further from it, in log space, than where the model is; widths take the rest.
    """
    found = transformer_blocks(model)
    if found is None:
        raise UnsupportedModel(
            f"{type(model).__name__} has no transformer blocks that its config counts; "
            "depth pruning needs one (num_hidden_layers)"
        )
    name, blocks = found
    floor = floor_blocks(len(blocks), layer_floor)
    removed: list[int] = []
    history: list[StepRecord] = []
    cost = measure(model, example_inputs)
    while cost.metric(metric) > goal and len(blocks) > floor:
        started = time.perf_counter()
        if block_score == "influence":
            scores = block_influence(model, blocks, calibration, loss_fn)
        else:
            scores = block_scores(model, blocks, calibration, loss_fn, method)
        scored = time.perf_counter() - started
        index = int(torch.argmin(scores))
        if nearest and _overshoots(cost, blocks[index], metric, goal):
            break
        remove_blocks_(model, name, [index])
        removed.append(index)
        cost = measure(model, example_inputs)
        record = StepRecord(
            len(history) + 1,
            cost.macs,
            cost.params,
            scored,
            time.perf_counter() - started - scored,
            1,
            {name: len(blocks)},
        )
        history.append(record)
        if on_step is not None:
            on_step(record)
    return history, name, removed
