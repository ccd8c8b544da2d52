"""Hessian-vector products by Pearlmutter's trick (one double-backward).

`hvp` takes any direction; `theta_hvp` is the product along the parameters themselves,
H θ, which is all that OBA needs (Sun et al., ICLR 2025: s = θ ⊙ Hθ).
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

Objective = Callable[[], Tensor]


def hvp(objective: Objective, params: Sequence[nn.Parameter], vectors: Sequence[Tensor]) -> list[Tensor]:
    """H v for the scalar `objective()` (which runs the forward pass), one entry per parameter.

    Parameters the objective does not reach, or reaches only linearly, get exact zeros.
    """
    value = objective()
    grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
    used = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
    products = [torch.zeros_like(p) for p in params]
    if not used:
        return products
    second = torch.autograd.grad(
        [g for _, g in used],
        [params[i] for i, _ in used],
        grad_outputs=[vectors[i].detach() for i, _ in used],
        allow_unused=True,
    )
    for (i, _), h in zip(used, second, strict=True):
        if h is not None:
            products[i] = h
    return products


def theta_hvp(objective: Objective, params: Sequence[nn.Parameter]) -> list[Tensor]:
    """H θ for the scalar `objective()`: the Hessian-vector product along the parameters."""
    return hvp(objective, params, [p.detach() for p in params])
