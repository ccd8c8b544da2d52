"""Per-parameter importance scores.

Every method shares one signature and returns, per named parameter, a tensor of the parameter's
shape: the mean over calibration batches of a per-batch score, summed in float32 (float64 for
float64 parameters) and returned in float64 (docs/decisions/0002-score-precision.md).

| method      | score           | quantity                                                 |
|-------------|-----------------|----------------------------------------------------------|
| `oba_full`  | θ ⊙ (Hθ)        | OBA share of θᵀHθ, full Hessian (Pearlmutter HVP)        |
| `oba`       | θ ⊙ ((H − G)θ)  | OBA as published: H less its Gauss-Newton part Jᵀ∇²ℓJ    |
| `taylor`    | −g ⊙ θ          | first-order loss change of removing θ (Molchanov 2019)   |
| `obd`       | ½ θ² ⊙ diag(H)  | OBD (LeCun 1989), diag(H) by Hutchinson's estimator      |
| `magnitude` | |θ|             | baseline                                                 |
| `random`    | U(0, 1)         | control                                                  |

`oba` is the Hessian-vector product of the loss *linearised at the model outputs*,
L̃(θ) = ⟨stopgrad(∂ℓ/∂f), f(θ)⟩, whose Hessian is Σ_k (∂ℓ/∂f_k) ∇²f_k = H − G. It costs the same
one double-backward as `oba_full`. It keeps only the curvature of the network itself, weighted
by the output gradient: where ∂ℓ/∂f = 0 (a distillation loss at its starting point, a perfectly
fit batch) it is exactly zero, so `oba` needs a task loss with labels; `oba_full` does not.
The loss must be a function of the model's outputs (every tensor the model returns, over every
call the loss makes); terms on the parameters themselves (weight decay) are not seen by `oba`.

Scores are taken in eval mode (dropout off, BatchNorm on running statistics): the curvature of
the model as it will be deployed, and no side effect on BatchNorm buffers. The model's mode is
restored afterwards.
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from worker.engine.errors import InvalidConfig, NumericalError
from worker.engine.hvp import hvp, plain_theta_hvp, theta_hvp
from worker.engine.modes import eval_mode

Method = Literal["oba", "oba_full", "taylor", "obd", "magnitude", "random"]
METHODS: tuple[str, ...] = get_args(Method)  # the built-in methods
LossFn = Callable[[nn.Module, Any], Tensor]
# How a channel's element scores become one (`groups.channel_scores`): `signed` sums them, so
# that opposite contributions cancel (OBA); `abs` sums their absolute values (Torch-Pruning's
# Taylor). `magnitude` is reduced by its L2 norm either way.
Reduction = Literal["signed", "abs"]


class Scorer(Protocol):
    """One batch's importance: per parameter, a tensor of the parameter's shape (higher is more
    important). A data-free scorer is called once, with `batch=None`. Register one with
    `register_scorer` to make its name a `PruneConfig.method`; the built-ins are registered so."""

    def __call__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        batch: Any,
        loss_fn: LossFn,
        generator: torch.Generator,
    ) -> list[Tensor]: ...


@dataclass(frozen=True)
class _Registered:
    scorer: Scorer
    needs_data: bool
    reduction: Reduction


_SCORERS: dict[str, _Registered] = {}


WIDE = (torch.float32, torch.float64)  # dtypes scores are summed in as they are


def register_scorer(
    name: str, scorer: Scorer, *, needs_data: bool = True, reduction: Reduction = "signed"
) -> None:
    """Make `name` a scoring method. `needs_data=False`: the scorer reads no batch (one call);
    `reduction`: how structured pruning sums its element scores over a channel (`Reduction`)."""
    _SCORERS[name] = _Registered(scorer, needs_data, reduction)


def scoring_methods() -> tuple[str, ...]:
    """Every registered method: the built-ins first."""
    return tuple(_SCORERS)


def needs_data(method: str) -> bool:
    return _SCORERS[method].needs_data


def reduction(method: str) -> Reduction:
    return _SCORERS[method].reduction


def registered_scorer(method: str) -> Scorer:
    """The scorer registered as `method`: to register it again under other options."""
    return _SCORERS[method].scorer


def parameter_scores(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    method: str,
    *,
    seed: int = 0,
    theta_shortcut: bool = True,
) -> dict[str, Tensor]:
    """Mean per-batch importance of every trainable parameter of `model` (see module docstring).

    `loss_fn(model, batch)` returns a scalar tensor. Scores are float64 on the parameters' device.
    `theta_shortcut=False` computes OBA's Hθ by the plain Hessian-vector product (`hvp.py`).
    """
    if method not in _SCORERS:
        methods = scoring_methods()
        raise InvalidConfig(f"unknown scoring method {method!r}; expected one of {methods}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise InvalidConfig("the model has no trainable parameters to score")
    names = [name for name, _ in named]
    params = [p for _, p in named]
    generator = torch.Generator(device=params[0].device).manual_seed(seed)

    registered = _SCORERS[method]
    if not registered.needs_data:
        data_free = registered.scorer(model, params, None, loss_fn, generator)
        return {n: s.detach().to(torch.float64) for n, s in zip(names, data_free, strict=True)}

    scorer = registered.scorer
    totals: list[Tensor] = []
    count = 0
    # The math kernel of scaled_dot_product_attention is the one with a double backward on CPU.
    shortcut = nullcontext() if theta_shortcut else plain_theta_hvp()
    with eval_mode(model), sdpa_kernel(SDPBackend.MATH), shortcut:
        for batch in batches:
            batch_scores = [s.detach() for s in scorer(model, params, batch, loss_fn, generator)]
            if not totals:  # the first pass's own scores (half precision widened to float32)
                totals = [s if s.dtype in WIDE else s.float() for s in batch_scores]
            else:
                for total, score in zip(totals, batch_scores, strict=True):
                    total.add_(score)
            count += 1
    if count == 0:
        raise InvalidConfig(f"method {method!r} needs at least one calibration batch")
    # Summed in float32 (float64 parameters: float64) while the passes run; a float64 sum
    # would hold twice the model's size through every later pass (2.5 GB for 314M
    # parameters). Widened at the end, when no pass's graph is alive any more.
    scores = {
        name: total.div_(count).to(torch.float64) for name, total in zip(names, totals, strict=True)
    }
    for name, score in scores.items():
        if not torch.isfinite(score).all():
            raise NumericalError(f"non-finite {method} scores for parameter {name!r}")
    return scores


def _oba_full(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: Any,
    loss_fn: LossFn,
    generator: torch.Generator,
) -> list[Tensor]:
    return _theta_times_hvp(lambda: loss_fn(model, batch), params)


def _oba(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: Any,
    loss_fn: LossFn,
    generator: torch.Generator,
) -> list[Tensor]:
    return _theta_times_hvp(lambda: linearised_loss(model, batch, loss_fn), params)


def _theta_times_hvp(objective: Callable[[], Tensor], params: list[nn.Parameter]) -> list[Tensor]:
    """θ ⊙ (Hθ) for the objective's Hessian, turning the products into scores in place."""
    products = theta_hvp(objective, params)
    return [hp.mul_(p.detach()) for p, hp in zip(params, products, strict=True)]


def _taylor(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: Any,
    loss_fn: LossFn,
    generator: torch.Generator,
) -> list[Tensor]:
    grads = torch.autograd.grad(loss_fn(model, batch), params, allow_unused=True)
    return [
        torch.zeros_like(p) if g is None else -g * p.detach()
        for p, g in zip(params, grads, strict=True)
    ]


def _obd(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: Any,
    loss_fn: LossFn,
    generator: torch.Generator,
) -> list[Tensor]:
    """½ θ² ⊙ diag(H), with diag(H) ≈ z ⊙ Hz for one Rademacher probe z per batch (Hutchinson).

    Unbiased for the true Hessian diagonal (unlike the empirical-Fisher g²); its variance falls
    with the number of calibration batches.
    """
    probes = [
        torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1
        for p in params
    ]
    products = hvp(lambda: loss_fn(model, batch), params, probes)
    return [
        0.5 * p.detach() ** 2 * z * hz for p, z, hz in zip(params, probes, products, strict=True)
    ]


def _magnitude(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: Any,
    loss_fn: LossFn,
    generator: torch.Generator,
) -> list[Tensor]:
    return [p.detach().abs() for p in params]


def _random(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: Any,
    loss_fn: LossFn,
    generator: torch.Generator,
) -> list[Tensor]:
    return [
        torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float64)
        for p in params
    ]


for _name, _scorer in (("oba_full", _oba_full), ("oba", _oba), ("taylor", _taylor), ("obd", _obd)):
    register_scorer(_name, _scorer)
register_scorer("magnitude", _magnitude, needs_data=False)
register_scorer("random", _random, needs_data=False)


def linearised_loss(model: nn.Module, batch: Any, loss_fn: LossFn) -> Tensor:
    """L̃(θ) = ⟨stopgrad(∂ℓ/∂f), f(θ)⟩ summed over every output tensor of every model call.

    Its gradient equals the loss gradient; its Hessian is H − G (the loss curvature removed).
    """
    outputs: list[Tensor] = []

    def record(module: nn.Module, args: Any, output: Any) -> None:
        outputs.extend(t for t in _tensors(output) if t.requires_grad)

    handle = model.register_forward_hook(record)
    try:
        loss = loss_fn(model, batch)
    finally:
        handle.remove()
    if not outputs:
        raise InvalidConfig("the loss does not depend on any differentiable model output")
    output_grads = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
    terms = [
        (g.detach() * f).sum() for f, g in zip(outputs, output_grads, strict=True) if g is not None
    ]
    if not terms:
        raise InvalidConfig("the loss does not depend on any differentiable model output")
    return torch.stack(terms).sum()


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
