"""Measuring a model before and after pruning: loss, accuracy, latency."""

import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine.cost import run_forward
from worker.pipeline.losses import LossFn, model_inputs


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict[str, Any]], loss_fn: LossFn) -> dict[str, float]:
    """Mean loss and, where the batches carry class labels, accuracy (eval mode). One forward
    pass per batch: the accuracy reads the output of the loss's own pass."""
    training = model.training
    model.eval()
    outputs: list[Any] = []
    handle = model.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        losses, correct, counted = [], 0, 0
        for batch in batches:
            outputs.clear()
            losses.append(float(loss_fn(model, batch)))
            labels = class_labels(batch)
            if labels is None:
                continue
            # the loss's pass when it made one, else a pass of its own (a loss may not call it)
            output = outputs[0] if outputs else model(**model_inputs(batch))
            logits = output.logits if hasattr(output, "logits") else output
            if not isinstance(logits, Tensor):  # a model without a task head: no classes
                continue
            # (…, classes): sequence and token classification alike
            predictions = logits.reshape(-1, logits.shape[-1]).argmax(-1)
            if predictions.numel() != labels.numel():  # labels of another kind than the head's
                continue
            correct += int((predictions == labels.reshape(-1)).sum())
            counted += labels.numel()
    finally:
        handle.remove()
        model.train(training)
    metrics = {"loss": sum(losses) / max(len(losses), 1)}
    if counted:
        metrics["accuracy"] = correct / counted
    return metrics


def class_labels(batch: dict[str, Any]) -> Tensor | None:
    """The batch's labels where they are classes (integers), which accuracy counts."""
    labels = batch.get("labels")
    return None if labels is None or labels.is_floating_point() else labels


@torch.no_grad()
def latency_ms(
    model: nn.Module,
    inputs: dict[str, Any],
    repeats: int = 9,
    budget_s: float = 0.05,
    warmup: int = 1,
) -> float:
    """Median wall time of one forward pass on `inputs` (after `warmup` passes: the first
    allocates and picks kernels), in milliseconds: up to `repeats` timed runs (odd: the median
    is one of them), fewer (five at least) once `budget_s` is spent, as timeit's autorange
    bounds its loops, so a model of 100 ms a pass costs half a second here, not two. Latency
    targets time with their own, stricter loop (`worker.pipeline.latency`)."""
    model.eval()
    for _ in range(warmup):
        run_forward(model, inputs)
    timings: list[float] = []
    while len(timings) < repeats and (len(timings) < 5 or sum(timings) < budget_s):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        run_forward(model, inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return 1000 * statistics.median(timings)
