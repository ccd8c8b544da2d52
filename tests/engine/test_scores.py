"""Scores against brute-force oracles (float64), and the documented properties of each method."""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.engine import models, oracle
from worker.engine import PruneConfig, parameter_scores, prune_
from worker.engine import scores as scores_module
from worker.engine.errors import InvalidConfig
from worker.engine.scores import LossFn, register_scorer, scoring_methods


def _case(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    if name == "mlp":
        model: nn.Module = models.mlp()
        inputs = torch.randn(10, 6, generator=generator, dtype=torch.float64)
    elif name == "cnn":
        model = models.ResidualCNN()
        models.randomise_batchnorm_(model, generator)
        inputs = torch.randn(4, 2, 6, 6, generator=generator, dtype=torch.float64)
    else:
        model = models.AttentionBlock()
        inputs = torch.randn(3, 5, 8, generator=generator, dtype=torch.float64)
    model = model.double().eval()
    labels = torch.randint(0, 3, (inputs.shape[0],), generator=generator)
    return model, inputs, labels


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def _flat(scores: dict[str, Tensor], model: nn.Module) -> Tensor:
    return torch.cat([scores[name].reshape(-1) for name, _ in model.named_parameters()])


@pytest.mark.parametrize("case", ["mlp", "cnn", "attention"])
@pytest.mark.parametrize(
    ("method", "oracle_fn"),
    [
        ("oba_full", oracle.full_hessian_theta),
        ("oba", oracle.gauss_newton_free_theta),
    ],
)
def test_oba_scores_equal_brute_force_hessian(
    case: str, method: str, oracle_fn: Callable[..., Tensor]
) -> None:
    model, inputs, labels = _case(case)
    expected = oracle_fn(model, inputs, lambda out: F.cross_entropy(out, labels))

    scores = parameter_scores(model, [(inputs, labels)], models.cross_entropy, method)

    assert expected.abs().max() > 1e-6  # the oracle is not trivially zero
    assert _relative_error(_flat(scores, model), expected) <= 1e-6
    assert all(s.dtype == torch.float64 for s in scores.values())


@pytest.mark.parametrize("case", ["cnn", "attention"])
def test_the_plain_hessian_vector_product_gives_the_same_exact_scores(case: str) -> None:
    """`theta_shortcut=False` (the switch for untested layers) is the plain Pearlmutter product:
    the same oracle holds."""
    model, inputs, labels = _case(case)
    expected = oracle.full_hessian_theta(model, inputs, lambda out: F.cross_entropy(out, labels))

    scores = parameter_scores(
        model, [(inputs, labels)], models.cross_entropy, "oba_full", theta_shortcut=False
    )

    assert _relative_error(_flat(scores, model), expected) <= 1e-6


def test_a_registered_scorer_is_a_method_prune_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Scorer protocol is public: a registered scorer is called per batch and drives pruning."""
    monkeypatch.setattr(scores_module, "_SCORERS", dict(scores_module._SCORERS))
    calls: list[int] = []

    def gradient_magnitude(
        model: nn.Module,
        params: list[nn.Parameter],
        batch: object,
        loss_fn: LossFn,
        generator: torch.Generator,
    ) -> list[Tensor]:
        calls.append(1)
        grads = torch.autograd.grad(loss_fn(model, batch), params, allow_unused=True)
        return [
            torch.zeros_like(p) if g is None else g.abs()
            for p, g in zip(params, grads, strict=True)
        ]

    register_scorer("gradient_magnitude", gradient_magnitude)
    model, inputs, labels = _case("cnn")
    batches = [(inputs, labels)] * 2
    config = PruneConfig(method="gradient_magnitude", target=0.6, steps=2)

    result = prune_(model, inputs, batches, models.cross_entropy, config)

    assert "gradient_magnitude" in scoring_methods()
    assert len(calls) == 4  # two batches per step, two steps
    assert result.macs <= 0.6 * result.initial_macs


def test_oba_differs_from_oba_full_by_the_gauss_newton_part() -> None:
    model, inputs, labels = _case("mlp")
    full = _flat(
        parameter_scores(model, [(inputs, labels)], models.cross_entropy, "oba_full"), model
    )
    partial = _flat(parameter_scores(model, [(inputs, labels)], models.cross_entropy, "oba"), model)

    assert _relative_error(partial, full) > 1e-2


def test_scores_are_the_mean_over_batches() -> None:
    model, inputs, labels = _case("mlp")
    halves = [(inputs[:5], labels[:5]), (inputs[5:], labels[5:])]
    together = parameter_scores(model, halves, models.cross_entropy, "oba_full")
    separate = [parameter_scores(model, [b], models.cross_entropy, "oba_full") for b in halves]

    for name, score in together.items():
        torch.testing.assert_close(score, (separate[0][name] + separate[1][name]) / 2)


def test_oba_vanishes_for_distillation_at_the_starting_point() -> None:
    model, inputs, _ = _case("mlp")
    with torch.no_grad():
        teacher = torch.softmax(model(inputs), dim=-1)

    def distill(m: nn.Module, batch: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(m(batch), dim=-1), teacher, reduction="batchmean")

    partial = _flat(parameter_scores(model, [inputs], distill, "oba"), model)
    full = _flat(parameter_scores(model, [inputs], distill, "oba_full"), model)

    assert partial.abs().max() < 1e-12
    assert full.abs().max() > 1e-6


def test_taylor_is_minus_gradient_times_weight() -> None:
    model, inputs, labels = _case("cnn")
    loss = models.cross_entropy(model, (inputs, labels))
    grads = torch.autograd.grad(loss, list(model.parameters()))

    scores = parameter_scores(model, [(inputs, labels)], models.cross_entropy, "taylor")

    for (name, p), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(scores[name], -(g * p).detach())


def test_obd_hutchinson_estimates_the_hessian_diagonal() -> None:
    model, inputs, labels = _case("mlp")
    flat_theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    hessian = torch.autograd.functional.hessian(
        lambda v: F.cross_entropy(
            torch.func.functional_call(model, oracle.unflatten_like(model, v), (inputs,)), labels
        ),
        flat_theta,
    )
    expected = 0.5 * flat_theta**2 * hessian.diagonal()

    estimate = _flat(
        parameter_scores(model, [(inputs, labels)] * 1600, models.cross_entropy, "obd"), model
    )

    # z ⊙ Hz = diag(H) + off-diagonal noise that averages out over probes
    assert _relative_error(estimate, expected) < 0.12


def test_magnitude_and_random_need_no_data_and_are_seeded() -> None:
    model, _, _ = _case("mlp")
    magnitude = parameter_scores(model, [], models.cross_entropy, "magnitude")
    first = parameter_scores(model, [], models.cross_entropy, "random", seed=3)
    second = parameter_scores(model, [], models.cross_entropy, "random", seed=3)

    for name, p in model.named_parameters():
        torch.testing.assert_close(magnitude[name], p.detach().abs())
        torch.testing.assert_close(first[name], second[name])


def test_scoring_leaves_mode_and_batchnorm_statistics_untouched() -> None:
    model, inputs, labels = _case("cnn")
    model.train()
    before = {n: b.clone() for n, b in model.named_buffers()}

    parameter_scores(model, [(inputs, labels)], models.cross_entropy, "oba")

    assert model.training
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_unknown_method_and_missing_batches_are_invalid_config() -> None:
    model, _, _ = _case("mlp")
    with pytest.raises(InvalidConfig, match="unknown scoring method"):
        parameter_scores(model, [], models.cross_entropy, "hessian")
    with pytest.raises(InvalidConfig, match="at least one calibration batch"):
        parameter_scores(model, [], models.cross_entropy, "oba")
