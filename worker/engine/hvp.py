"""Hessian-vector products by Pearlmutter's trick (one double-backward).

`hvp` takes any direction; `theta_hvp` is the product along the parameters themselves,
H θ, which is all that OBA needs (Sun et al., ICLR 2025: s = θ ⊙ Hθ). Along θ the double-backward
of every layer linear in its weight can reuse the layer's forward output and first-backward input
gradient, two matmuls (convolutions) fewer per layer; `theta_linear` implements that shortcut.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from worker.engine.theta_linear import theta_layers

Objective = Callable[[], Tensor]


def hvp(
    objective: Objective, params: Sequence[nn.Parameter], vectors: Sequence[Tensor]
) -> list[Tensor]:
    """H v for the scalar `objective()` (which runs the forward pass), one entry per parameter.

    Parameters the objective does not reach, or reaches only linearly, get exact zeros.
    """
    value = objective()
    grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
    used = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
    del grads
    products: list[Tensor | None] = [None] * len(params)
    if used:
        second = torch.autograd.grad(
            [g for _, g in used],
            [params[i] for i, _ in used],
            grad_outputs=[vectors[i].detach() for i, _ in used],
            allow_unused=True,
        )
        for (i, _), h in zip(used, second, strict=True):
            products[i] = h
    # Zeros only now, once the graph is gone: allocated before the second backward they would
    # add a copy of the model to its peak (0.3× a training step's memory on ResNet-18).
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, products, strict=True)]


_THETA_SHORTCUT: ContextVar[bool] = ContextVar("theta_shortcut", default=True)


@contextmanager
def plain_theta_hvp() -> Iterator[None]:
    """Within the block, `theta_hvp` is the plain `hvp(objective, params, θ)`: the switch for
    models whose layers the θ-specific backward was never tested on."""
    token = _THETA_SHORTCUT.set(False)
    try:
        yield
    finally:
        _THETA_SHORTCUT.reset(token)


def theta_hvp(objective: Objective, params: Sequence[nn.Parameter]) -> list[Tensor]:
    """H θ for the scalar `objective()`: the Hessian-vector product along the parameters.

    The same double-backward as `hvp(objective, params, θ)`, with the forward pass run under
    `theta_layers` so that Linear, addmm, convolution and norm layers take the cheaper exact path.
    The directions share memory with the parameters: that is how each layer recognises v = θ.
    Under `plain_theta_hvp()` it is that plain product.
    """
    if not _THETA_SHORTCUT.get():
        return hvp(objective, params, [p.detach() for p in params])

    def traced() -> Tensor:
        with theta_layers(params):
            return objective()

    return hvp(traced, params, [p.detach() for p in params])
