"""theta_hvp (with the θ shortcut of theta_linear) against the plain double-backward, float64."""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.engine import models
from worker.engine import theta_linear
from worker.engine.hvp import hvp, theta_hvp
from worker.engine.theta_linear import theta_layers

Case = tuple[nn.Module, Callable[[], Tensor]]


def plain_theta_hvp(objective: Callable[[], Tensor], params: list[nn.Parameter]) -> list[Tensor]:
    """H θ by autograd twice, grad_outputs = θ: the reference the shortcut must reproduce."""
    grads = torch.autograd.grad(objective(), params, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    second = torch.autograd.grad(
        [grads[i] for i in used],
        [params[i] for i in used],
        grad_outputs=[params[i].detach() for i in used],
        allow_unused=True,
    )
    products = [torch.zeros_like(p) for p in params]
    for i, product in zip(used, second, strict=True):
        if product is not None:
            products[i] = product
    return products


class MixedConvolutions(nn.Module):
    """Strided, padded, dilated, depthwise and grouped Conv2d, BatchNorm, a residual, in-place ops
    straight after a convolution, a Conv3d, and a Conv1d over the flattened positions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4)
        self.bn1 = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 6, 1, groups=2)
        self.relu = nn.ReLU(inplace=True)
        self.volume = nn.Conv3d(6, 6, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.sequence = nn.Conv1d(6, 5, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.bn0(self.stem(x)))
        x = x + torch.tanh(self.bn1(self.depthwise(x)))
        x = self.relu(self.grouped(x).mul_(1.5))  # in place on the convolution output, twice
        x = torch.sigmoid(self.volume(x.unsqueeze(2)).squeeze(2))
        # (batch, channels, height, width) -> (batch, channels, positions)
        x = torch.tanh(self.bn2(self.sequence(x.flatten(2))))
        return self.head(x.mean(dim=2))


class TiedMLP(nn.Module):
    """One weight used twice directly and once transposed (the transposed use falls back)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        return self.head(torch.tanh(F.linear(h, self.shared.weight.t())))


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: y = addmm(b, x, W) with W stored as (in, out)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.5 * torch.randn(d_in, d_out))
        self.bias = nn.Parameter(0.1 * torch.randn(d_out))

    def forward(self, x: Tensor) -> Tensor:
        # (..., in) -> (rows, in) -> (rows, out) -> (..., out)
        y = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return y.view(*x.shape[:-1], -1)


class GPT2Block(nn.Module):
    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = Conv1D(dim, 4 * dim)
        self.proj = Conv1D(4 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.proj(F.gelu(self.fc(self.norm(x))))
        return self.head(x.mean(dim=1))


class ComputedBias(nn.Module):
    """A θ weight with a bias computed from another parameter (its cotangent is not the bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5, bias=False)
        self.raw_bias = nn.Parameter(torch.randn(5))
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(F.linear(x, self.fc.weight, torch.tanh(self.raw_bias))))


class WithUnusedParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = models.mlp()
        self.unused = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _build(name: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(3)
    model: nn.Module
    if name in ("mlp", "frozen_bias"):
        model, inputs = models.mlp(), torch.randn(10, 6)
    elif name == "mlp_without_bias":
        model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False))
        inputs = torch.randn(10, 6)
    elif name == "residual_cnn":
        model, inputs = models.ResidualCNN(), torch.randn(4, 2, 6, 6)
    elif name == "mixed_convolutions":
        model, inputs = MixedConvolutions(), torch.randn(3, 2, 9, 9)
    elif name == "tied":
        model, inputs = TiedMLP(), torch.randn(7, 5)
    elif name == "attention":
        model, inputs = models.AttentionBlock(), torch.randn(3, 5, 8)
    elif name == "computed_bias":
        model, inputs = ComputedBias(), torch.randn(10, 6)
    elif name == "gpt2_conv1d":
        model, inputs = GPT2Block(), torch.randn(2, 4, 6)
    else:
        model, inputs = WithUnusedParameter(), torch.randn(10, 6)
    models.randomise_batchnorm_(model, generator)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.weight.data = 1 + 0.3 * torch.randn(module.num_features)
            module.running_var = 0.5 + torch.rand(module.num_features)
        if isinstance(module, nn.LayerNorm):
            module.weight.data = 1 + 0.3 * torch.randn(module.normalized_shape)
            module.bias.data = 0.2 * torch.randn(module.normalized_shape)
    if name == "frozen_bias":
        model[2].bias.requires_grad_(False)
    return model.double().eval(), inputs.double()


def _case(name: str) -> Case:
    model, inputs = _build(name)
    labels = torch.randint(0, 3, (inputs.shape[0],), generator=torch.Generator().manual_seed(5))
    return model, lambda: F.cross_entropy(model(inputs), labels)


def _relative_error(actual: list[Tensor], expected: list[Tensor]) -> float:
    a = torch.cat([t.reshape(-1) for t in actual])
    e = torch.cat([t.reshape(-1) for t in expected])
    assert e.norm() > 1e-8  # the reference is not trivially zero
    return float((a - e).norm() / e.norm())


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


CASES = [
    "mlp",
    "mlp_without_bias",
    "frozen_bias",
    "residual_cnn",
    "mixed_convolutions",
    "tied",
    "attention",
    "gpt2_conv1d",
    "computed_bias",
    "unused_parameter",
]


@pytest.mark.parametrize("keep", ["every x̄", "no x̄"])
@pytest.mark.parametrize("name", CASES)
def test_theta_hvp_equals_the_plain_double_backward(
    name: str, keep: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # both ways of getting Vᵀȳ: the kept first-backward x̄, and recomputing it
    threshold = 0 if keep == "every x̄" else 10**12
    monkeypatch.setattr(theta_linear, "MIN_MACS_PER_KEPT_ELEMENT", threshold)
    model, objective = _case(name)
    params = _trainable(model)

    fast = theta_hvp(objective, params)

    assert _relative_error(fast, plain_theta_hvp(objective, params)) <= 1e-10


def test_a_parameter_without_gradient_gets_zeros() -> None:
    model, objective = _case("unused_parameter")
    params = _trainable(model)

    unused = dict(model.named_parameters())["unused"]

    products = theta_hvp(objective, params)

    assert torch.equal(products[params.index(unused)], torch.zeros(4, dtype=torch.float64))


def test_the_shortcut_applies_to_theta_weights_of_each_layer_kind() -> None:
    torch.manual_seed(0)
    linear, conv1d, conv2d, conv3d = (
        nn.Linear(4, 3),
        nn.Conv1d(2, 3, 3),
        nn.Conv2d(2, 3, 3),
        nn.Conv3d(2, 3, 3),
    )
    batch_norm, layer_norm, addmm = nn.BatchNorm2d(2).eval(), nn.LayerNorm(4), Conv1D(4, 3)
    calls: list[tuple[nn.Module, Tensor, str]] = [
        (linear, torch.randn(5, 4), "_ThetaLayerBackward"),
        (addmm, torch.randn(5, 4), "ViewBackward0"),  # the view of the _ThetaLayer output
        (conv1d, torch.randn(2, 2, 6), "_ThetaLayerBackward"),
        (conv2d, torch.randn(2, 2, 6, 6), "_ThetaLayerBackward"),
        (conv3d, torch.randn(2, 2, 5, 5, 5), "_ThetaLayerBackward"),
        (batch_norm, torch.randn(2, 2, 3, 3), "_ThetaLayerBackward"),
        (layer_norm, torch.randn(5, 4), "_ThetaLayerNormBackward"),
    ]
    for module, inputs, expected in calls:
        with theta_layers(list(module.parameters())):
            output = module(inputs)
        assert output.grad_fn is not None
        assert output.grad_fn.name() == expected
    with theta_layers(list(addmm.parameters())):
        output = torch.addmm(addmm.bias, torch.randn(5, 4), addmm.weight)
    assert output.grad_fn is not None and output.grad_fn.name() == "_ThetaLayerBackward"


class Fallbacks(nn.Module):
    """A layer call of each kind the shortcut must leave to the native op."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(5, 5)
        self.frozen = nn.Linear(5, 5).requires_grad_(False)
        self.same = nn.Conv1d(1, 1, 3, padding="same")
        self.norm = nn.BatchNorm1d(5)
        self.norm.weight.data = 1 + 0.3 * torch.randn(5)
        self.head = nn.Linear(5 if kind != "unbatched_convolution" else 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x))
        if self.kind == "unbatched_convolution":
            return self.head(torch.tanh(FALLBACKS[self.kind](self, h[:1])))
        return self.head(torch.tanh(FALLBACKS[self.kind](self, h)))


FALLBACKS: dict[str, Callable[["Fallbacks", Tensor], Tensor]] = {
    "frozen_weight": lambda m, x: F.linear(x, m.frozen.weight, m.frozen.bias),
    "transformed_weight": lambda m, x: F.linear(x, 2 * m.fc.weight, m.fc.bias),
    "string_padding": lambda m, x: m.same(x.unsqueeze(1)).squeeze(1),
    "unbatched_convolution": lambda m, x: F.conv1d(x, m.same.weight),
    "scaled_addmm": lambda m, x: torch.addmm(m.fc.bias, x, m.fc.weight.T, beta=0.5),
    "batch_norm_in_training": lambda m, x: F.batch_norm(
        x, None, None, m.norm.weight, m.norm.bias, training=True
    ),
}


@pytest.mark.parametrize("kind", list(FALLBACKS))
def test_fallback_cases_equal_the_plain_double_backward(kind: str) -> None:
    torch.manual_seed(1)
    model = Fallbacks(kind).double()
    inputs = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (6 if kind != "unbatched_convolution" else 1,))
    params = _trainable(model)

    def objective() -> Tensor:
        return F.cross_entropy(model(inputs), labels)

    with theta_layers(params):
        h = torch.tanh(model.fc(inputs))
        if kind == "unbatched_convolution":
            h = h[:1]
        fallback_output = FALLBACKS[kind](model, h)
    assert fallback_output.grad_fn is not None
    assert not fallback_output.grad_fn.name().startswith("_Theta")

    fast = theta_hvp(objective, params)

    assert _relative_error(fast, plain_theta_hvp(objective, params)) <= 1e-10


def test_autocast_keeps_the_native_op() -> None:
    model = Fallbacks("frozen_weight")
    x = torch.randn(4, 5)
    with theta_layers(list(model.parameters())), torch.autocast("cpu", dtype=torch.bfloat16):
        output = F.linear(x, model.fc.weight, model.fc.bias)
    assert output.grad_fn is not None
    assert not output.grad_fn.name().startswith("_Theta")


def test_parameters_listed_twice_fall_back_to_the_explicit_products() -> None:
    model, objective = _case("residual_cnn")
    params = _trainable(model)
    doubled = params + params[:3]

    fast = theta_hvp(objective, doubled)

    assert _relative_error(fast, plain_theta_hvp(objective, doubled)) <= 1e-10


def test_hvp_along_other_directions_is_unchanged() -> None:
    model, objective = _case("attention")
    params = _trainable(model)
    generator = torch.Generator().manual_seed(9)
    directions = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    value = objective()
    grads = torch.autograd.grad(value, params, create_graph=True)
    expected = torch.autograd.grad(grads, params, grad_outputs=directions)

    products = hvp(objective, params, directions)

    assert _relative_error(products, list(expected)) <= 1e-12


def test_first_backward_weight_gradients_are_placeholders_only_while_building_a_graph() -> None:
    # the first backward of an HVP (create_graph) leaves W̄ unread; a plain gradient is real
    linear = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    params = list(linear.parameters())
    with theta_layers(params):
        loss = (linear(x) ** 2).sum()
    placeholder = torch.autograd.grad(loss, params, create_graph=True)[0]
    assert placeholder.stride() == (0, 0) and not placeholder.any()

    with theta_layers(params):
        loss = (linear(x) ** 2).sum()
    real = torch.autograd.grad(loss, params)[0]
    expected = torch.autograd.grad((linear(x) ** 2).sum(), params)[0]
    assert torch.allclose(real, expected)
