"""Brute-force second-order oracles on flattened parameters (small float64 models only)."""

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call


def _flat_call(model: nn.Module) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def unflatten(vector: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, p in named:
            out[name] = vector[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return out

    return flat, unflatten


def unflatten_like(model: nn.Module, vector: Tensor) -> dict[str, Tensor]:
    return _flat_call(model)[1](vector)


def full_hessian_theta(
    model: nn.Module, inputs: Tensor, loss_of_outputs: Callable[[Tensor], Tensor]
) -> Tensor:
    """θ ⊙ (Hθ) with H the exact Hessian of loss(model(inputs)) in the flat parameters."""
    flat, unflatten = _flat_call(model)

    def loss(vector: Tensor) -> Tensor:
        return loss_of_outputs(functional_call(model, unflatten(vector), (inputs,)))

    hessian = torch.autograd.functional.hessian(loss, flat)
    return flat * (hessian @ flat)


def gauss_newton_free_theta(
    model: nn.Module, inputs: Tensor, loss_of_outputs: Callable[[Tensor], Tensor]
) -> Tensor:
    """θ ⊙ ((H − G)θ) with G = Jᵀ ∇²ℓ J, all matrices formed explicitly."""
    flat, unflatten = _flat_call(model)

    def outputs(vector: Tensor) -> Tensor:
        return functional_call(model, unflatten(vector), (inputs,))

    def loss(vector: Tensor) -> Tensor:
        return loss_of_outputs(outputs(vector))

    hessian = torch.autograd.functional.hessian(loss, flat)
    f = outputs(flat).detach()
    jacobian = torch.autograd.functional.jacobian(outputs, flat).reshape(f.numel(), -1)
    output_hessian = torch.autograd.functional.hessian(
        lambda o: loss_of_outputs(o.view_as(f)), f.reshape(-1)
    )
    gauss_newton = jacobian.T @ output_hessian @ jacobian
    return flat * ((hessian - gauss_newton) @ flat)
