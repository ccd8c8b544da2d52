"""A cheaper double-backward for layers linear in their weight, exact when the direction is θ.

`theta_hvp` takes H θ = ∂/∂θ ⟨∇L(θ), v⟩ at v = θ by one double-backward (Pearlmutter 1994). For a
layer y = W x + b (Linear, addmm, Conv1d/2d/3d; eval-mode BatchNorm alike, with x standardised by
its running statistics), the first backward computes x̄ = Wᵀȳ, W̄ = ȳxᵀ and b̄ = Σȳ. The second
backward receives cotangents u on x̄, V on W̄, c on b̄ and must return

    on ȳ:  W u + V x + c
    on x:  Vᵀ ȳ
    on W:  ȳ uᵀ

Along v = θ the cotangent on W̄ is the weight itself: the second backward is seeded with
grad_outputs = θ, and a leaf's gradient is the sum of its uses' W̄, so every use (tied weights too)
receives V = W. Then V x + b = y is the layer's own forward output and Vᵀ ȳ = x̄ is what the first
backward already computed, so two of the four matmuls (convolutions) of the plain double-backward
of each layer disappear. This is exact arithmetic, not an approximation.

LayerNorm gets a closed-form second backward (`_LayerNormGrad`) on the fused native kernels, about
a third of the elementwise passes of PyTorch's generic one.

Safety: `theta_layers(params)` swaps these functions in only for calls whose weight is one of
`params` (by identity) and whose arguments are plain dense floating-point tensors; every other call
runs the normal op. The shortcut itself is taken only when V arrives sharing memory with W (so it
provably equals W) and the kept forward output and x̄ were not modified in place since; otherwise
the second backward computes V x and Vᵀȳ explicitly, which is exact for any V.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.overrides import TorchFunctionMode

Grads = tuple[Tensor | None, Tensor | None, Tensor | None]
Mask = tuple[bool, bool, bool]


@dataclass(frozen=True)
class _Dense:
    """y = x Wᵀ + b over the last dimension of x: W is (out, in), x is (..., in)."""

    keeps: ClassVar[bool] = True  # y and x̄ are kept: each saves a matmul in the second backward

    def accepts(self, x: Tensor, weight: Tensor) -> bool:
        return weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1]

    def linear_part(self) -> "_Dense":
        return self

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def backward(self, grad_y: Tensor, x: Tensor, weight: Tensor, mask: Mask) -> Grads:
        """(x̄, W̄, b̄) for the cotangent ȳ, each only where `mask` asks for it."""
        # (..., out) -> (rows, out) and (..., in) -> (rows, in)
        rows_grad = grad_y.reshape(-1, grad_y.shape[-1])
        return (
            grad_y @ weight if mask[0] else None,
            rows_grad.T @ x.reshape(-1, x.shape[-1]) if mask[1] else None,
            rows_grad.sum(0) if mask[2] else None,
        )

    def bias_shape(self, weight: Tensor) -> torch.Size:
        return weight.shape[:1]

    def bias_view(self, bias: Tensor, weight: Tensor) -> Tensor:
        return bias


@dataclass(frozen=True)
class _Convolution:
    """y = conv(x, W) + b for a batched Conv1d/2d/3d with the given geometry."""

    keeps: ClassVar[bool] = True  # y and x̄ are kept: each saves a convolution

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int

    def accepts(self, x: Tensor, weight: Tensor) -> bool:
        return x.dim() == weight.dim() == len(self.stride) + 2  # batched input only

    def linear_part(self) -> "_Convolution":
        return self

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return torch.ops.aten.convolution(
            x,
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0] * len(self.stride),
            self.groups,
        )

    def backward(self, grad_y: Tensor, x: Tensor, weight: Tensor, mask: Mask) -> Grads:
        """(x̄, W̄, b̄) for the cotangent ȳ, each only where `mask` asks for it."""
        grads: Grads = torch.ops.aten.convolution_backward(
            grad_y,
            x,
            weight,
            [weight.shape[0]] if mask[2] else None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0] * len(self.stride),
            self.groups,
            list(mask),
        )
        return grads

    def bias_shape(self, weight: Tensor) -> torch.Size:
        return weight.shape[:1]

    def bias_view(self, bias: Tensor, weight: Tensor) -> Tensor:
        # (out,) -> (out, 1, ..., 1), broadcast over the spatial dimensions
        return bias.view(-1, *[1] * len(self.stride))


@dataclass(frozen=True, eq=False)
class _BatchNormEval:
    """y = (x − m) / √(v + ε) ⊙ w + b over channel dim 1: eval-mode BatchNorm, running stats m, v.

    Affine in x with a constant offset; its x-linear part is the same map with m = 0.
    """

    keeps: ClassVar[bool] = False  # one fused elementwise pass redoes y or x̄: keep no activation

    mean: Tensor
    var: Tensor
    eps: float
    trailing: int

    def accepts(self, x: Tensor, weight: Tensor) -> bool:
        return x.dim() == self.trailing + 2 and weight.shape == x.shape[1:2] == self.mean.shape

    def linear_part(self) -> "_BatchNormEval":
        return _BatchNormEval(torch.zeros_like(self.mean), self.var, self.eps, self.trailing)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.batch_norm(x, self.mean, self.var, weight, bias, False, 0.0, self.eps)

    def backward(self, grad_y: Tensor, x: Tensor, weight: Tensor, mask: Mask) -> Grads:
        """(x̄, w̄, b̄) for the cotangent ȳ, each only where `mask` asks for it (one fused pass)."""
        grads: Grads = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, self.mean, self.var, None, None, False, self.eps, list(mask)
        )
        return grads

    def bias_shape(self, weight: Tensor) -> torch.Size:
        return weight.shape

    def bias_view(self, bias: Tensor, weight: Tensor) -> Tensor:
        # (C,) -> (C, 1, ..., 1), broadcast over the dimensions after the channel one
        return bias.view(-1, *[1] * self.trailing)


_Layer = _Dense | _Convolution | _BatchNormEval


class _ThetaLayer(torch.autograd.Function):
    """y = W x + b whose backward is `_ThetaLayerGrad`, so that its double-backward is cheap."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, layer: _Layer
    ) -> Tensor:
        y = layer.forward(x, weight, bias)
        ctx.save_for_backward(x, weight, bias)  # type: ignore[arg-type]
        ctx.layer = layer  # type: ignore[attr-defined]
        ctx.output = _Kept(y) if layer.keeps else None  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        # A backward that builds a graph (create_graph=True) is the first backward of a
        # Hessian-vector product, whose W̄ value nothing reads; the second backward passes
        # through here without a graph, and there W̄ is real.
        placeholder = torch.is_grad_enabled()
        bias = None if bias is None else bias.detach()
        grad_x, grad_weight, grad_bias = _ThetaLayerGrad.apply(
            grad_y, x, weight, bias, ctx.output, ctx.layer, mask, placeholder
        )
        return grad_x, grad_weight, grad_bias, None


# Keeping x̄ costs its elements until the second backward; recomputing it costs one matmul
# (convolution) of the layer's MACs. Below this many MACs per kept element, recompute: a strided
# 1×1 shortcut convolution saves 32, ResNet-18's 3×3 convolutions 288–4608, a Linear layer its
# output width. On ResNet-18 at batch 32 the shortcuts' x̄ is 13 MB (3% of scoring's peak, the
# part over 3× a training step) and recomputing it costs under 1% of the time.
MIN_MACS_PER_KEPT_ELEMENT = 128


def _saves_enough(grad_y: Tensor, x: Tensor, weight: Tensor) -> bool:
    # MACs of y = W x: every output element takes one row of W (in channels × kernel volume)
    return grad_y.numel() * weight[0].numel() >= MIN_MACS_PER_KEPT_ELEMENT * x.numel()


class _ThetaLayerGrad(torch.autograd.Function):
    """(x̄, W̄, b̄) of one layer; its backward is the θ-shortcut second backward (module docstring)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        grad_y: Tensor,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        output: "_Kept | None",
        layer: _Layer,
        mask: Mask,
        placeholder: bool,
    ) -> Grads:
        grads = layer.backward(grad_y, x, weight, (mask[0], mask[1] and not placeholder, mask[2]))
        if mask[1] and placeholder:
            # The second backward seeds W̄'s cotangent (with θ) and returns ȳ uᵀ on W: neither
            # reads W̄. A zero-strided stand-in of its shape saves a matmul (convolution) per
            # layer and a copy of the weights at the peak of scoring.
            grads = (grads[0], weight.new_zeros(()).expand(weight.shape), grads[2])
        grad_x = grads[0]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_y, x, weight)
        ctx.bias = bias  # type: ignore[attr-defined]
        ctx.output = output  # type: ignore[attr-defined]
        kept = None
        if layer.keeps and grad_x is not None and _saves_enough(grad_y, x, weight):
            kept = _Kept(grad_x)
        ctx.grad_x = kept  # type: ignore[attr-defined]
        ctx.layer = layer  # type: ignore[attr-defined]
        return grads

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, cot_grad_x: Tensor | None, cot_weight: Tensor | None, cot_bias: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        grad_y, x, weight = ctx.saved_tensors
        layer: _Layer = ctx.layer
        output = None if ctx.output is None else ctx.output.take()
        grad_x = None if ctx.grad_x is None else ctx.grad_x.take()
        along_theta = cot_weight is not None and _same_memory(cot_weight, weight)

        cot_grad_y = None
        if ctx.needs_input_grad[0]:
            terms: list[Tensor] = []
            if cot_grad_x is not None:
                terms.append(layer.linear_part().forward(cot_grad_x, weight, None))  # W u
            shift = cot_bias
            if along_theta and output is not None:
                terms.append(output)  # V x + b = y
                shift = _difference(cot_bias, ctx.bias)
            elif cot_weight is not None:
                terms.append(layer.forward(x, cot_weight, None))  # V x
            if shift is not None:
                terms.append(layer.bias_view(shift, weight).expand_as(grad_y))
            cot_grad_y = _sum(terms)

        cot_x = None
        if ctx.needs_input_grad[1] and cot_weight is not None:
            if along_theta and grad_x is not None:
                cot_x = grad_x  # Vᵀ ȳ = x̄
            else:
                cot_x = layer.backward(grad_y, x, cot_weight, (True, False, False))[0]

        cot_w = None
        if ctx.needs_input_grad[2] and cot_grad_x is not None:
            tangent = layer.linear_part()
            cot_w = tangent.backward(grad_y, cot_grad_x, weight, (False, True, False))[1]  # ȳ uᵀ
        return cot_grad_y, cot_x, cot_w, None, None, None, None, None


@dataclass(frozen=True)
class _LayerNorm:
    """LayerNorm over the trailing `shape`: y = x̂ ⊙ w + b, x̂ = (x − μ) r, r = 1/√(σ² + ε)."""

    shape: list[int]
    eps: float

    def accepts(self, x: Tensor, weight: Tensor) -> bool:
        # reduced precision: the native kernels accumulate in float32, the second backward would not
        return list(weight.shape) == self.shape == list(x.shape[x.dim() - len(self.shape) :]) and (
            x.dtype in (torch.float32, torch.float64)
        )

    def bias_shape(self, weight: Tensor) -> torch.Size:
        return weight.shape


class _ThetaLayerNorm(torch.autograd.Function):
    """LayerNorm whose backward is `_LayerNormGrad` (fused native kernels both ways)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, layer: _LayerNorm
    ) -> Tensor:
        y, mean, rstd = torch.native_layer_norm(x, layer.shape, weight, bias, layer.eps)
        ctx.save_for_backward(x, weight, bias)  # type: ignore[arg-type]
        ctx.stats = (mean, rstd, layer)  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        bias = None if bias is None else bias.detach()
        grads = _LayerNormGrad.apply(grad_y, x, weight, bias, *ctx.stats, mask)
        return *grads, None


class _LayerNormGrad(torch.autograd.Function):
    """(x̄, w̄, b̄) of LayerNorm and their exact second backward in closed form.

    With ĝ = ȳ ⊙ w and P(v) = v − mean(v) − x̂ mean(v x̂) (row means), the first backward is
    x̄ = r P(ĝ), w̄ = Σ ȳ x̂, b̄ = Σ ȳ. For cotangents u on x̄, V on w̄, c on b̄ and ũ = r P(u):

        on ȳ:  w ⊙ ũ + V ⊙ x̂ + c
        on w:  Σ ȳ ⊙ ũ
        on x:  r P(ȳ ⊙ V) − r (B ũ + A x̄) − r² x̂ (mean(u ĝ) − mean(u) mean(ĝ) − A B)

    with A = mean(u x̂), B = mean(ĝ x̂); r P(ȳ ⊙ V) is x̄ again along θ (V = w). The x term
    differentiates ⟨u, x̄⟩ = r (⟨u, ĝ⟩ − D mean(u) mean(ĝ)) − r D A B through r
    (∂r/∂x = −r² x̂ / D), D A and D B (whose gradients are ũ and x̄). About a dozen elementwise
    passes, where PyTorch's generic LayerNorm double-backward takes ~40. Nothing is kept beyond
    the plain graph's saved tensors: the norm's passes are cheap to redo, its activations are not.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        grad_y: Tensor,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        mean: Tensor,
        rstd: Tensor,
        layer: _LayerNorm,
        mask: Mask,
    ) -> Grads:
        grads: Grads = torch.ops.aten.native_layer_norm_backward(
            grad_y, x, layer.shape, mean, rstd, weight, bias, list(mask)
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_y, x, weight)
        ctx.stats = (mean, rstd, layer)  # type: ignore[attr-defined]
        return grads

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, cot_grad_x: Tensor | None, cot_weight: Tensor | None, cot_bias: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        grad_y, x, weight = ctx.saved_tensors
        mean, rstd, layer = ctx.stats
        axes = tuple(range(-len(layer.shape), 0))
        rows = tuple(range(x.dim() - len(layer.shape)))
        x_hat = (x - mean) * rstd
        needs_x = ctx.needs_input_grad[1]
        grad_x = None  # x̄ = r P(ĝ), computed at most once
        if needs_x and (cot_grad_x is not None or cot_weight is not None):
            grad_x = _layer_norm_input_grad(grad_y, x, weight, mean, rstd, layer)

        cot_x_terms: list[Tensor] = []
        cot_w = None
        if cot_grad_x is not None:
            u_mean = cot_grad_x.mean(axes, keepdim=True)
            a = (cot_grad_x * x_hat).mean(axes, keepdim=True)
            u_tilde = (cot_grad_x - u_mean - x_hat * a) * rstd
            if grad_x is not None:
                g_hat = grad_y * weight
                g_mean = g_hat.mean(axes, keepdim=True)
                b = (g_hat * x_hat).mean(axes, keepdim=True)
                cross = (cot_grad_x * g_hat).mean(axes, keepdim=True) - u_mean * g_mean - a * b
                term = x_hat * (-rstd * rstd * cross)
                term.addcmul_(u_tilde, -rstd * b).addcmul_(grad_x, -rstd * a)
                cot_x_terms.append(term)
            if ctx.needs_input_grad[2]:
                cot_w = (grad_y * u_tilde).sum(rows)
        if grad_x is not None and cot_weight is not None:
            if _same_memory(cot_weight, weight):
                cot_x_terms.append(grad_x)  # r P(ȳ ⊙ V) = x̄ along θ
            else:
                cot_x_terms.append(_layer_norm_input_grad(grad_y, x, cot_weight, mean, rstd, layer))

        cot_grad_y = None
        if ctx.needs_input_grad[0]:
            terms = [] if cot_grad_x is None else [u_tilde * weight]
            if cot_weight is not None:
                terms.append(x_hat * cot_weight)
            if cot_bias is not None:
                terms.append(cot_bias.expand_as(grad_y))
            cot_grad_y = _sum(terms)
        return cot_grad_y, _sum(cot_x_terms), cot_w, None, None, None, None, None


def _layer_norm_input_grad(
    grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, layer: _LayerNorm
) -> Tensor:
    """x̄ = r P(ȳ ⊙ w) by the native kernel."""
    grad_x: Tensor = torch.ops.aten.native_layer_norm_backward(
        grad_y, x, layer.shape, mean, rstd, weight, None, [True, False, False]
    )[0]
    return grad_x


@contextmanager
def theta_layers(params: Sequence[Tensor]) -> Iterator[None]:
    """Within the block, layers whose weight is one of `params` get the θ-shortcut double-backward.

    Wrap the forward pass only; the gradients may be taken after the block. It serves
    Hessian-vector products only: the first backward's weight gradients of these layers are
    zero placeholders (their values are never needed by the second backward).
    """
    with _ThetaLayers(params):
        yield


@dataclass(frozen=True)
class _Call:
    """One layer call: `param` must be one of θ, the layer sees `weight`."""

    x: Any
    param: Any
    weight: Any
    bias: Any
    layer: _Layer | _LayerNorm


def _linear_call(input: Any, weight: Any, bias: Any = None) -> _Call:
    return _Call(input, weight, weight, bias, _Dense())


def _addmm_call(
    input: Any, mat1: Any, mat2: Any, *, beta: Any = 1, alpha: Any = 1, out: Any = None
) -> _Call | None:
    """torch.addmm(b, x, W) with W (in, out), as in Hugging Face's Conv1D: the layer sees Wᵀ."""
    if beta != 1 or alpha != 1 or out is not None or not isinstance(mat2, Tensor):
        return None
    if not isinstance(mat1, Tensor) or mat1.dim() != 2:
        return None
    return _Call(mat1, mat2, mat2.t(), input, _Dense())


def _conv_call(
    input: Any,
    weight: Any,
    bias: Any = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: Any = 1,
) -> _Call | None:
    if isinstance(padding, str) or not isinstance(weight, Tensor):
        return None
    dims = weight.dim() - 2
    stride, padding, dilation = (
        [value] * dims if isinstance(value, int) else list(value)
        for value in (stride, padding, dilation)
    )
    return _Call(input, weight, weight, bias, _Convolution(stride, padding, dilation, groups))


def _batch_norm_call(
    input: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: Any = 0.1,
    eps: float = 1e-5,
) -> _Call | None:
    """Eval-mode BatchNorm (running statistics): affine in x, linear in its weight."""
    stats = (running_mean, running_var)
    if training or not all(isinstance(s, Tensor) and not s.requires_grad for s in stats):
        return None
    if not isinstance(input, Tensor) or input.dim() < 2:
        return None
    if any(s.dtype != input.dtype or s.device != input.device or s.dim() != 1 for s in stats):
        return None
    layer = _BatchNormEval(running_mean, running_var, eps, input.dim() - 2)
    return _Call(input, weight, weight, bias, layer)


def _layer_norm_call(
    input: Any, normalized_shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5
) -> _Call:
    return _Call(input, weight, weight, bias, _LayerNorm(list(normalized_shape), eps))


_PARSERS: dict[Callable[..., Any], Callable[..., _Call | None]] = {
    F.linear: _linear_call,
    torch.addmm: _addmm_call,
    torch.conv1d: _conv_call,
    torch.conv2d: _conv_call,
    torch.conv3d: _conv_call,
    F.batch_norm: _batch_norm_call,
    F.layer_norm: _layer_norm_call,
}
_PLAIN_TYPES = (Tensor, nn.Parameter)


class _ThetaLayers(TorchFunctionMode):
    """Routes eligible layer calls through `_ThetaLayer`; passes every other call through."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        super().__init__()
        self._params = {id(p): p for p in params}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        parse = _PARSERS.get(func)
        if parse is not None:
            try:
                call = parse(*args, **kwargs)
            except TypeError:  # arguments the op itself will reject
                call = None
            if call is not None and self._eligible(call):
                function = _ThetaLayerNorm if isinstance(call.layer, _LayerNorm) else _ThetaLayer
                return function.apply(call.x, call.weight, call.bias, call.layer)
        return func(*args, **kwargs)

    def _eligible(self, call: _Call) -> bool:
        """Whether the shortcut provably applies: a trainable θ weight on plain dense tensors."""
        param, x, weight, bias = call.param, call.x, call.weight, call.bias
        if not isinstance(param, Tensor) or self._params.get(id(param)) is not param:
            return False
        if not (param.is_leaf and param.requires_grad):
            return False
        tensors = [x, weight] if bias is None else [x, weight, bias]
        if not all(type(t) in _PLAIN_TYPES for t in tensors):
            return False
        if not all(
            t.layout == torch.strided and t.dtype == x.dtype and t.device == x.device
            for t in tensors
        ):
            return False
        if not x.is_floating_point() or not call.layer.accepts(x, weight):
            return False
        if bias is not None and bias.shape != call.layer.bias_shape(weight):
            return False
        return torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)


class _Kept:
    """A tensor kept for one later use, without a copy and without a reference cycle.

    `take` hands it out once and lets it go, so that it lives no longer than the plain graph's
    saved tensors; it returns None if the tensor was modified in place meanwhile (or was already
    taken), and the caller then recomputes it.
    """

    def __init__(self, tensor: Tensor) -> None:
        self._tensor: Tensor | None = tensor.detach()  # shares storage and version counter
        self._version = tensor._version

    def take(self) -> Tensor | None:
        tensor, self._tensor = self._tensor, None
        return tensor if tensor is not None and tensor._version == self._version else None


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether `a` is a view of exactly the elements of `b`, hence equal to it."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def _difference(cot_bias: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """c − b, the part of the bias cotangent that y does not already hold (None for zero)."""
    if bias is None:
        return cot_bias
    if cot_bias is None:
        return -bias
    return None if _same_memory(cot_bias, bias) else cot_bias - bias


def _sum(terms: list[Tensor]) -> Tensor | None:
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
