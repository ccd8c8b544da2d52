"""Loss functions a job can name. Each is `loss(model, batch) -> scalar` for the engine."""

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[nn.Module, dict[str, Any]], Tensor]


def _inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def logits_of(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    output = model(**_inputs(batch))
    return output.logits if hasattr(output, "logits") else output


def _labels(batch: dict[str, Any], loss: str) -> Tensor:
    if "labels" not in batch:
        raise ValueError(f"loss {loss!r} needs a 'labels' array in the dataset")
    return batch["labels"]


def cross_entropy(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    logits = logits_of(model, batch)
    # (…, classes) -> (rows, classes): sequence and token classification alike
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), _labels(batch, "cross_entropy").reshape(-1).long()
    )


def mse(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    logits = logits_of(model, batch)
    return F.mse_loss(logits, _labels(batch, "mse").to(logits.dtype).view_as(logits))


def causal_lm(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    logits = logits_of(model, batch)
    tokens = batch["input_ids"]
    # predict token t+1 from tokens ≤ t: (batch, tokens-1, vocab) against (batch, tokens-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def distillation(teacher: nn.Module) -> LossFn:
    """KL(teacher ‖ student) on the outputs: needs no labels.

    At the starting point student = teacher, so the loss and its gradient are zero: `oba` and
    `taylor` score nothing on the first step; `oba_full` (which keeps the loss curvature) does.
    """
    frozen = copy.deepcopy(teacher).eval().requires_grad_(False)

    def loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
        with torch.no_grad():
            target = F.log_softmax(logits_of(frozen, batch), dim=-1)
        student = F.log_softmax(logits_of(model, batch), dim=-1)
        return F.kl_div(
            student.reshape(-1, student.shape[-1]),
            target.reshape(-1, target.shape[-1]),
            log_target=True,
            reduction="batchmean",
        )

    return loss


def make_loss(name: str, model: nn.Module) -> LossFn:
    if name == "distill":
        return distillation(model)
    return {"cross_entropy": cross_entropy, "mse": mse, "causal_lm": causal_lm}[name]
