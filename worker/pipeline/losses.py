"""Loss functions a job can name. Each is `loss(model, batch) -> scalar` for the engine."""

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.pipeline.models import Pooling

LossFn = Callable[[nn.Module, dict[str, Any]], Tensor]
NEED_LABELS = ("cross_entropy", "mse")  # the losses that read a 'labels' column


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def logits_of(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    output = model(**model_inputs(batch))
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


TEACHER_CACHE_BYTES = 256 * 2**20  # teacher targets kept per job (a batch's logits may be more)


def distillation(teacher: nn.Module, pooling: Pooling | None = None) -> LossFn:
    """The student's distance to the unpruned model (the teacher) on what the model outputs:
    needs no labels.

    - outputs with logits: KL(teacher ‖ student) of the output distributions;
    - otherwise the embeddings the model is used for (`representations`), per row r:
      (1 − cos(s_r, t_r)) + ‖s_r − t_r‖² / ‖t_r‖², averaged over rows and summed over
      embeddings. The cosine term is what retrieval compares; the relative squared error also
      holds the norm (it matters where no Normalize follows) and keeps the loss free of the
      embedding's scale.

    At the starting point student = teacher, so the loss and its gradient are zero: `oba` and
    `taylor` score nothing on the first step; `oba_full` (which keeps the loss curvature) does.
    Both branches are twice differentiable, as the Hessian-vector products need.
    """
    frozen = copy.deepcopy(teacher).eval().requires_grad_(False)
    # The teacher never changes and a job passes over the same batches again and again
    # (measurements, every step's scores): its targets are kept per batch, up to a budget.
    kept: dict[int, tuple[dict[str, Any], Tensor | dict[str, Tensor]]] = {}
    room = [TEACHER_CACHE_BYTES]

    def targets(batch: dict[str, Any]) -> Tensor | dict[str, Tensor]:
        hit = kept.get(id(batch))
        if hit is not None and hit[0] is batch:  # the very batch (it is kept alive with it)
            return hit[1]
        with torch.no_grad():
            output = frozen(**model_inputs(batch))
            found: Tensor | dict[str, Tensor] = (
                F.log_softmax(_logits(output), dim=-1)
                if _has_logits(output)
                else representations(output, batch, pooling)
            )
        tensors = [found] if isinstance(found, Tensor) else list(found.values())
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size <= room[0]:
            kept[id(batch)] = (batch, found)
            room[0] -= size
        return found

    def loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
        target = targets(batch)
        output = model(**model_inputs(batch))
        if isinstance(target, Tensor):
            return _kl(_logits(output), target)
        student_rows = representations(output, batch, pooling)
        return torch.stack([embedding_distance(student_rows[k], target[k]) for k in target]).sum()

    return loss


def _has_logits(output: Any) -> bool:
    return isinstance(output, Tensor) or getattr(output, "logits", None) is not None


def _logits(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits


def _kl(student_logits: Tensor, target: Tensor) -> Tensor:
    """KL(teacher ‖ student) from the student's logits and the teacher's log-probabilities."""
    student = F.log_softmax(student_logits, dim=-1)
    return F.kl_div(
        student.reshape(-1, student.shape[-1]),
        target.reshape(-1, target.shape[-1]),
        log_target=True,
        reduction="batchmean",
    )


def embedding_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over rows of (1 − cos(s, t)) + ‖s − t‖² / ‖t‖²; (rows, dim) each. Zero at s = t."""
    cosine = F.cosine_similarity(student, teacher, dim=-1)
    relative = (student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)
    return (1 - cosine + relative).mean()


def representations(
    output: Any, batch: dict[str, Any], pooling: Pooling | None
) -> dict[str, Tensor]:
    """The (rows, dim) embeddings a model without a task head is used for:

    - a sentence-transformers folder: its sentence embedding (`sentence_embedding`);
    - CLIP-style projections: `text_embeds` and / or `image_embeds`;
    - any other base model: its last hidden state, averaged over the tokens that
      `attention_mask` keeps (all tokens without one; the spatial axes of a feature map).
    """
    mask = batch.get("attention_mask")
    if pooling is not None:
        return {"sentence": sentence_embedding(_last_hidden_state(output), mask, pooling)}
    projected = {
        name: getattr(output, name)
        for name in ("text_embeds", "image_embeds")
        if getattr(output, name, None) is not None
    }
    return projected or {"hidden": _mean_over_tokens(_last_hidden_state(output), mask)}


def _last_hidden_state(output: Any) -> Tensor:
    state = getattr(output, "last_hidden_state", None)
    return state if state is not None else output[0]


def _mean_over_tokens(hidden: Tensor, mask: Tensor | None) -> Tensor:
    if hidden.dim() == 4:  # (rows, channels, height, width) feature maps
        return hidden.mean(dim=(2, 3))
    if hidden.dim() != 3:
        return hidden.flatten(1)
    # (rows, tokens, dim) -> (rows, dim)
    weights = _token_mask(hidden, mask).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def _token_mask(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """(rows, tokens) weights: the attention mask where it matches the tokens, else all ones."""
    if mask is None or mask.shape != hidden.shape[:2]:
        return hidden.new_ones(hidden.shape[:2])
    return mask.to(hidden.dtype)


def sentence_embedding(hidden: Tensor, mask: Tensor | None, pooling: Pooling) -> Tensor:
    """sentence-transformers' Pooling (then Normalize) of (rows, tokens, dim) token states,
    one (rows, dim) block per mode, concatenated in the order the library uses."""
    keep = _token_mask(hidden, mask)  # (rows, tokens)
    weights = keep.unsqueeze(-1)
    count = weights.sum(1).clamp_min(1e-9)  # (rows, 1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    tokens = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
    first = keep.argmax(1)  # the first kept token (left padding skipped)
    blocks = []
    for mode in pooling.modes:
        if mode == "cls":
            blocks.append(hidden[rows, first])
        elif mode == "max":
            blocks.append(hidden.masked_fill(weights == 0, float("-inf")).amax(1))
        elif mode == "mean":
            blocks.append((hidden * weights).sum(1) / count)
        elif mode == "mean_sqrt_len_tokens":
            blocks.append((hidden * weights).sum(1) / count.sqrt())
        elif mode == "weightedmean":
            # positions count from the first kept token: 1, 2, … (rows, tokens, 1)
            position = (tokens - first.unsqueeze(1).to(hidden.dtype)).unsqueeze(-1) * weights
            blocks.append((hidden * position).sum(1) / position.sum(1).clamp_min(1e-9))
        else:  # lasttoken: the last kept token (right padding skipped)
            last = hidden.shape[1] - 1 - keep.flip(1).argmax(1)
            blocks.append(hidden[rows, last])
    embedding = torch.cat(blocks, dim=-1)
    return F.normalize(embedding, dim=-1) if pooling.normalize else embedding


def make_loss(name: str, model: nn.Module, pooling: Pooling | None = None) -> LossFn:
    """The loss `name` for `model`; `pooling` is the model's sentence-transformers pooling,
    which `distill` compares embeddings after."""
    if name == "distill":
        return distillation(model, pooling)
    return {"cross_entropy": cross_entropy, "mse": mse, "causal_lm": causal_lm}[name]
