"""What unstructured and 2:4 pruning remove, against an independent ranking of known scores; and
that `random` follows its seed.

docs/engine.md: an element's rank is |score| over its layer's largest |score|, ties broken by |θ|
over the layer's largest |θ|; `unstructured` masks the lowest ranks, `2:4` keeps the two best of
every four consecutive input weights. The oracles below sort (rank, tie-break) pairs as Python
tuples, so they share no code with the engine's additive rank and top-k.
"""

import itertools
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.engine import models
from tests.engine.fixed_scores import FIXED, use_fixed_scores
from worker.engine import PruneConfig, parameter_scores, prune_

Ranked = list[tuple[float, float, str, int]]  # (rank, tie-break, weight name, flat index)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).double()


class Conv1D(nn.Module):
    """transformers' GPT-2 `Conv1D` as the engine recognises it: weight stored (in, out)."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nx, self.nf = nx, nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight)


def _tied_scores(shape: tuple[int, ...], scale: float, levels: int, seed: int) -> Tensor:
    """Signed scores on a few levels (many exact ties), the top level present. `scale` is a
    power of two, so a layer's normalised scores are exactly level / levels in any layer."""
    generator = torch.Generator().manual_seed(seed)
    level = torch.randint(1, levels + 1, shape, generator=generator).double()
    level.view(-1)[0] = levels
    sign = torch.randint(0, 2, shape, generator=generator).double() * 2 - 1
    return scale * level * sign


def _ranked(scores: dict[str, Tensor], weights: dict[str, Tensor]) -> Ranked:
    """Every element by documented rank, lowest first."""
    ranked: Ranked = []
    for name, score in scores.items():
        s = score.abs().flatten().tolist()
        w = weights[name].abs().flatten().tolist()
        ranked += [(s[i] / max(s), w[i] / max(w), name, i) for i in range(len(s))]
    return sorted(ranked)


def _pruned(masks: dict[str, Tensor]) -> set[tuple[str, int]]:
    return {(n, i) for n, m in masks.items() for i in (~m).flatten().nonzero().flatten().tolist()}


def _assert_applied(model: nn.Module, before: dict[str, Tensor], masks: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all()
        assert torch.equal(params[name][mask], before[name][mask])


def _prune_with_scores(
    monkeypatch: pytest.MonkeyPatch,
    model: nn.Module,
    scores: dict[str, Tensor],
    example: Tensor,
    **settings: Any,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Prune as `settings` say with the given scores; the weights before, and the masks."""
    params = dict(model.named_parameters())
    use_fixed_scores(monkeypatch, {params[name]: score for name, score in scores.items()})
    before = {name: p.detach().clone() for name, p in params.items()}
    config = PruneConfig(method=FIXED, **settings)
    result = prune_(model, example, [], models.cross_entropy, config)
    return before, result.masks


def _mlp_scores() -> dict[str, Tensor]:
    # scales 2**12 apart: only normalising per layer lets the layers compete
    return {
        "0.weight": _tied_scores((16, 8), 8.0, 6, seed=1),
        "2.weight": _tied_scores((16, 16), 2.0**-9, 6, seed=2),
        "4.weight": _tied_scores((4, 16), 1.0, 6, seed=3),
    }


def test_unstructured_masks_exactly_the_lowest_ranked_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _mlp()
    scores = _mlp_scores()
    weights = {name: p.detach() for name, p in model.named_parameters()}
    ranked = _ranked(scores, weights)
    count = round(0.4 * len(ranked))
    assert ranked[count - 1][0] == ranked[count][0]  # the cut splits a tie: |θ| must decide

    before, masks = _prune_with_scores(
        monkeypatch,
        model,
        scores,
        torch.randn(2, 8).double(),
        granularity="unstructured",
        target_metric="sparsity",
        target=0.4,
        steps=1,
    )

    assert _pruned(masks) == {(name, i) for *_, name, i in ranked[:count]}
    _assert_applied(model, before, masks)


def test_per_layer_sparsity_masks_the_lowest_ranked_weights_of_each_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _mlp()
    scores = _mlp_scores()
    weights = {name: p.detach() for name, p in model.named_parameters()}
    expected = set()
    for name, score in scores.items():
        ranked = _ranked({name: score}, weights)
        count = round(0.3 * len(ranked))
        expected |= {(n, i) for *_, n, i in ranked[:count]}

    before, masks = _prune_with_scores(
        monkeypatch,
        model,
        scores,
        torch.randn(2, 8).double(),
        granularity="unstructured",
        target_metric="sparsity",
        target=0.3,
        steps=1,
        per_layer_sparsity=True,
    )

    assert _pruned(masks) == expected
    _assert_applied(model, before, masks)


def _best_two_of_four(score: Tensor, weight: Tensor, in_axis: int) -> Tensor:
    """Keep mask: in every run of four consecutive positions along `in_axis`, the two best by
    (|score| / layer's largest, |θ| / layer's largest)."""
    s = score.abs() / score.abs().max()
    w = weight.detach().abs() / weight.detach().abs().max()
    keep = torch.zeros(score.shape, dtype=torch.bool)
    for index in itertools.product(*(range(n) for n in score.shape)):
        if index[in_axis] % 4:
            continue
        four = [(*index[:in_axis], index[in_axis] + k, *index[in_axis + 1 :]) for k in range(4)]
        for position in sorted(four, key=lambda i: (float(s[i]), float(w[i])))[2:]:
            keep[position] = True
    return keep


def test_two_four_keeps_the_two_best_of_every_four_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    # inputs along axis 1 of a conv's (out, in, kh, kw) and a Linear's (out, in) weight, axis 0
    # of a Conv1D's (in, out)
    model = nn.Sequential(
        nn.Conv2d(8, 4, 3), nn.Flatten(), Conv1D(16, 8), nn.ReLU(), nn.Linear(8, 3)
    ).double()
    in_axes = {"0.weight": 1, "2.weight": 0, "4.weight": 1}
    params = dict(model.named_parameters())
    scores = {
        name: _tied_scores(tuple(params[name].shape), 2.0**-k, 3, seed=k)
        for k, name in enumerate(in_axes)
    }
    expected = {n: _best_two_of_four(scores[n], params[n], axis) for n, axis in in_axes.items()}
    for name, axis in in_axes.items():  # in every layer, some fours tie across the cut
        fours = scores[name].abs().movedim(axis, -1).reshape(-1, 4).sort(dim=1).values
        assert (fours[:, 1] == fours[:, 2]).any()

    before, masks = _prune_with_scores(
        monkeypatch,
        model,
        scores,
        torch.randn(2, 8, 4, 4).double(),
        granularity="2:4",
    )

    assert set(masks) == set(in_axes)
    for name, keep in expected.items():
        assert torch.equal(masks[name], keep), name
    _assert_applied(model, before, masks)


def test_random_scores_follow_the_seed() -> None:
    model = _mlp()

    def draw(seed: int) -> dict[str, Tensor]:
        return parameter_scores(model, [], models.cross_entropy, "random", seed=seed)

    first, again, other = draw(3), draw(3), draw(4)

    for name, score in first.items():
        assert score.shape == dict(model.named_parameters())[name].shape
        assert float(score.min()) >= 0.0 and float(score.max()) < 1.0
        assert torch.equal(score, again[name])
        assert not torch.equal(score, other[name])


@pytest.mark.parametrize("granularity", ["unstructured", "channel"])
def test_random_selection_follows_the_seed(granularity: str) -> None:
    def selection(seed: int) -> object:
        model = _mlp()
        example = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        if granularity == "unstructured":
            config = PruneConfig(
                method="random",
                granularity="unstructured",
                target_metric="sparsity",
                target=0.5,
                steps=2,
                seed=seed,
            )
            result = prune_(model, example, [], models.cross_entropy, config)
            return {name: mask.tolist() for name, mask in result.masks.items()}
        config = PruneConfig(method="random", target=0.5, steps=2, seed=seed)
        return prune_(model, example, [], models.cross_entropy, config).plan.history

    assert selection(5) == selection(5)
    assert selection(5) != selection(6)
