"""Unstructured and N:M (2:4) weight masks ranked by element scores.

Element rank, following OBA's unstructured setting: |mean score| normalised by its layer's
maximum, so layers with large curvature do not absorb the whole budget; |θ| breaks ties.
"""

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine.config import FinetuneFn, PruneConfig
from worker.engine.cost import measure
from worker.engine.groups import is_conv1d_transposed
from worker.engine.results import StepRecord
from worker.engine.scores import LossFn, parameter_scores

TIE_BREAK = 1e-6


def eligible_weights(model: nn.Module, ignored: tuple[str, ...]) -> dict[str, nn.Parameter]:
    """Weights of Linear, Conv and transformers' Conv1D layers outside the ignored modules."""
    out = {}
    for name, module in model.named_modules():
        if any(name == i or name.startswith(i + ".") for i in ignored):
            continue
        prunable = isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
        if (prunable or is_conv1d_transposed(module)) and module.weight.requires_grad:
            out[f"{name}.weight" if name else "weight"] = module.weight
    return out


def apply_masks_(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero every masked weight (masks hold True where a weight is kept)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)


def sparsity(model: nn.Module, masks: dict[str, Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


def _element_rank(score: Tensor, weight: Tensor) -> Tensor:
    magnitude = score.abs()
    top = magnitude.max()
    rank = magnitude / top if top > 0 else magnitude
    w = weight.detach().abs().to(torch.float64)
    return rank + TIE_BREAK * w / max(float(w.max()), 1e-30)


def prune_unstructured_(
    model: nn.Module,
    example_inputs: Any,
    calibration: list[Any],
    loss_fn: LossFn,
    config: PruneConfig,
    on_step: Callable[[StepRecord], None] | None = None,
    finetune: FinetuneFn | None = None,
) -> tuple[dict[str, Tensor], list[StepRecord]]:
    """Mask weights in place to exactly `config.target` sparsity over the eligible weights."""
    weights = eligible_weights(model, config.ignored_layers)
    masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    history = []
    for step in range(1, config.steps + 1):
        goal_sparsity = 1.0 - config.step_target(step) if step < config.steps else config.target
        started = time.perf_counter()
        scores = parameter_scores(
            model,
            calibration,
            loss_fn,
            config.method,
            seed=config.seed + step,
            theta_shortcut=config.theta_shortcut,
        )
        seconds_scoring = time.perf_counter() - started
        ranks = {}
        for name, weight in weights.items():
            rank = _element_rank(scores[name], weight)
            ranks[name] = rank.masked_fill(~masks[name], -1.0)  # what is pruned stays pruned
        if config.per_layer_sparsity:
            for name, rank in ranks.items():
                masks[name] = _keep_top(rank, rank.numel() - round(goal_sparsity * rank.numel()))
        else:
            flat = torch.cat([r.reshape(-1) for r in ranks.values()])
            keep = _keep_top(flat, flat.numel() - round(goal_sparsity * flat.numel()))
            offset = 0
            for name, rank in ranks.items():
                masks[name] = keep[offset : offset + rank.numel()].view_as(rank)
                offset += rank.numel()
        apply_masks_(model, masks)
        if finetune is not None:
            finetune(model, step)
            apply_masks_(model, masks)
        cost = measure(model, example_inputs)
        record = StepRecord(
            step,
            cost.macs,
            cost.params,
            seconds_scoring,
            time.perf_counter() - started - seconds_scoring,
            sum(int((~m).sum()) for m in masks.values()),
            {},
        )
        history.append(record)
        if on_step is not None:
            on_step(record)
    return masks, history


def _keep_top(rank: Tensor, count: int) -> Tensor:
    keep = torch.zeros(rank.numel(), dtype=torch.bool, device=rank.device)
    if count > 0:
        keep[torch.topk(rank.reshape(-1), count, sorted=False).indices] = True
    return keep.view_as(rank)


def prune_2_4_(
    model: nn.Module,
    calibration: list[Any],
    loss_fn: LossFn,
    config: PruneConfig,
) -> tuple[dict[str, Tensor], list[str]]:
    """Keep the 2 highest-ranked of every 4 consecutive input weights (NVIDIA's 2:4 pattern).

    Layers whose input width is not a multiple of 4 are left dense and returned by name.
    """
    weights = eligible_weights(model, config.ignored_layers)
    scores = parameter_scores(
        model,
        calibration,
        loss_fn,
        config.method,
        seed=config.seed,
        theta_shortcut=config.theta_shortcut,
    )
    modules = dict(model.named_modules())
    masks, skipped = {}, []
    for name, weight in weights.items():
        module = modules[name.rpartition(".")[0]]
        in_axis = 0 if is_conv1d_transposed(module) else 1
        if weight.shape[in_axis] % 4:
            skipped.append(name)
            continue
        rank = _element_rank(scores[name], weight).movedim(in_axis, -1)
        # (…, in) -> (blocks, 4): blocks of 4 consecutive input weights
        blocks = rank.reshape(-1, 4)
        keep = torch.zeros_like(blocks, dtype=torch.bool)
        keep.scatter_(1, blocks.topk(2, dim=1).indices, True)
        masks[name] = keep.view(rank.shape).movedim(-1, in_axis)
    apply_masks_(model, masks)
    return masks, skipped


def is_valid_n_m(mask: Tensor, in_axis: int, n: int = 2, m: int = 4) -> bool:
    """Every block of m consecutive inputs keeps exactly n weights."""
    blocks = mask.movedim(in_axis, -1).reshape(-1, m)
    return bool((blocks.sum(1) == n).all())
