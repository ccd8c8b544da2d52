"""Unstructured and 2:4 behaviours that a mutation run of `worker/engine/unstructured.py` found
untested (issue 20, build item 7): which weights are eligible, the exact count at the last step,
layers that score nothing, half-precision tie-breaks, what each step records, and that the
config's seed and `theta_shortcut` reach the scores.

docs/engine.md, "Unstructured and 2:4": rank = |score| over its layer's largest, |θ| breaks
ties; `unstructured` masks exactly round(sparsity × eligible weights).
"""

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.engine import models
from tests.engine.fixed_scores import FIXED, use_fixed_scores
from tests.engine.test_removal_oracles import Conv1D
from worker.engine import PruneConfig, prune_, unstructured
from worker.engine import hvp as hvp_module
from worker.engine.config import Granularity
from worker.engine.results import StepRecord
from worker.engine.unstructured import eligible_weights, is_valid_n_m


def _sparsity(target: float, steps: int = 1, **settings: Any) -> PruneConfig:
    return PruneConfig(
        method="magnitude",
        granularity="unstructured",
        target_metric="sparsity",
        target=target,
        steps=steps,
        **settings,
    )


def _zeros(model: nn.Module) -> int:
    return sum(int((w == 0).sum()) for w in eligible_weights(model, ()).values())


def test_ignoring_a_container_keeps_the_layers_inside_it_dense_and_prunes_the_rest() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            block=nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
            block2=nn.Linear(8, 8),  # shares the name's prefix, not the module
            head=nn.Linear(8, 3),
        )
    )
    config = _sparsity(0.5, ignored_layers=("block",))

    result = prune_(model, torch.randn(2, 8), [], models.cross_entropy, config)

    assert set(result.masks) == {"block2.weight", "head.weight"}
    assert (model.block[0].weight != 0).all()
    assert sum(int((~m).sum()) for m in result.masks.values()) == round(0.5 * (64 + 24))


def test_a_model_that_is_one_layer_is_pruned_under_its_parameter_name() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)

    result = prune_(model, torch.randn(2, 4), [], models.cross_entropy, _sparsity(0.5))

    assert set(result.masks) == {"weight"}
    assert int((model.weight == 0).sum()) == 8


@pytest.mark.parametrize("steps", [1, 2])
def test_the_last_step_masks_round_target_times_the_eligible_weights_at_a_half(
    steps: int,
) -> None:
    """0.1 × 15 = 1.5000000000000002 rounds to 2; the schedule's last goal, 1 − (1 − 0.1), lands
    just under 1.5 and would round to 1: the last step masks by the target itself."""
    assert round(0.1 * 15) == 2 and round((1 - (1 - 0.1)) * 15) == 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))

    result = prune_(model, torch.randn(2, 5), [], models.cross_entropy, _sparsity(0.1, steps))

    assert _zeros(model) == 2
    assert result.sparsity == pytest.approx(2 / 15)


def test_exactly_one_weight_is_kept_when_the_target_leaves_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))

    prune_(model, torch.randn(2, 2), [], models.cross_entropy, _sparsity(0.875))

    assert _zeros(model) == 7


def test_a_layer_that_scores_nothing_is_masked_first_by_magnitude(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every score of the first layer is 0 (its normalised rank is 0, not 0/0): it goes before
    any weight of a scored layer, its smallest |θ| first."""
    torch.manual_seed(0)
    unscored, scored = nn.Linear(8, 4, bias=False), nn.Linear(4, 4, bias=False)
    model = nn.Sequential(unscored, nn.ReLU(), scored)
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(4, 4, generator=generator, dtype=torch.float64) + 0.5
    use_fixed_scores(monkeypatch, {dict(model.named_parameters())["2.weight"]: scores})
    expected = set(unscored.weight.detach().abs().flatten().argsort()[:16].tolist())
    config = PruneConfig(
        method=FIXED, granularity="unstructured", target_metric="sparsity", target=16 / 48, steps=1
    )

    result = prune_(model, torch.randn(2, 8), [], models.cross_entropy, config)

    assert set((~result.masks["0.weight"]).flatten().nonzero().flatten().tolist()) == expected
    assert result.masks["2.weight"].all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ties_are_broken_by_magnitude_in_a_half_precision_model(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """Scores tie everywhere, so |θ| alone decides. In float16, 1e-6 × |θ| for |θ| in [0.5, 1)
    lies among the subnormals, 6e-8 apart: some 9 levels for 128 weights (bfloat16 keeps 8 bits
    of each). The tie-break is taken in float64, where the 128 stay apart."""
    layer = nn.Linear(8, 16, bias=False).to(dtype)
    model = nn.Sequential(layer)
    magnitudes = 0.5 + torch.randperm(128, generator=torch.Generator().manual_seed(0)) / 256
    with torch.no_grad():
        layer.weight.copy_(magnitudes.view(16, 8))
    assert layer.weight.detach().flatten().unique().numel() == 128  # distinct in `dtype`
    ones = torch.ones(16, 8, dtype=torch.float64)
    use_fixed_scores(monkeypatch, {dict(model.named_parameters())["0.weight"]: ones})
    config = PruneConfig(
        method=FIXED, granularity="unstructured", target_metric="sparsity", target=0.5, steps=1
    )

    result = prune_(model, torch.randn(2, 8, dtype=dtype), [], models.cross_entropy, config)

    pruned = (~result.masks["0.weight"]).flatten()
    assert torch.equal(pruned, magnitudes < 0.75)


def test_each_step_records_its_number_cost_and_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock that moves only while scores are computed (2 s) and while the model is fine-tuned
    (3 s): the record's scoring time is the one, its pruning time the rest of the step."""
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(unstructured, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    real_scores = unstructured.parameter_scores

    def timed_scores(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
        clock.now += 2.0
        return real_scores(*args, **kwargs)

    monkeypatch.setattr(unstructured, "parameter_scores", timed_scores)
    finetuned: list[int] = []

    def finetune(model: nn.Module, step: int) -> None:
        clock.now += 3.0
        finetuned.append(step)

    reported: list[StepRecord] = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    result = prune_(
        model,
        torch.randn(2, 8),
        [],
        models.cross_entropy,
        _sparsity(0.75, steps=2, schedule="linear"),
        on_step=reported.append,
        finetune=finetune,
    )

    assert finetuned == [1, 2]
    assert result.history == reported
    total = 8 * 16 + 16 * 4
    assert [r.step for r in reported] == [1, 2]
    assert [r.channels_removed for r in reported] == [round(0.375 * total), round(0.75 * total)]
    for record in reported:
        assert (record.macs, record.params) == (2 * total, total + 16 + 4)  # masks keep shapes
        assert (record.seconds_scoring, record.seconds_pruning) == (2.0, 3.0)
        assert record.widths == {}


def test_two_four_finds_the_input_axis_of_a_nested_conv1d() -> None:
    """transformers' Conv1D sits inside blocks (GPT-2's `h.0.attn.c_attn`) and stores its
    weight (in, out): its fours run along axis 0."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(block=nn.Sequential(Conv1D(8, 12)), act=nn.ReLU(), head=nn.Linear(12, 3))
    )

    result = prune_(
        model,
        torch.randn(2, 8),
        [],
        models.cross_entropy,
        PruneConfig(granularity="2:4", method="magnitude"),
    )

    assert set(result.masks) == {"block.0.weight", "head.weight"}
    assert is_valid_n_m(result.masks["block.0.weight"], in_axis=0)
    assert is_valid_n_m(result.masks["head.weight"], in_axis=1)


def test_two_four_with_no_layer_of_four_inputs_leaves_the_model_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))

    result = prune_(
        model,
        torch.randn(2, 3),
        [],
        models.cross_entropy,
        PruneConfig(granularity="2:4", method="magnitude"),
    )

    assert result.masks == {}
    assert result.dense_layers == ["0.weight", "2.weight"]
    assert result.sparsity == 0.0


def test_two_four_random_masks_follow_the_seed() -> None:
    def masks(seed: int) -> dict[str, list[Any]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        config = PruneConfig(method="random", granularity="2:4", seed=seed)
        result = prune_(model, torch.randn(2, 8), [], models.cross_entropy, config)
        return {name: mask.tolist() for name, mask in result.masks.items()}

    assert masks(5) == masks(5)
    assert masks(5) != masks(6)


@pytest.mark.parametrize("granularity", ["unstructured", "2:4"])
@pytest.mark.parametrize("theta_shortcut", [True, False])
def test_theta_shortcut_decides_how_oba_scores_are_computed(
    monkeypatch: pytest.MonkeyPatch, granularity: Granularity, theta_shortcut: bool
) -> None:
    """docs/engine.md: `theta_shortcut=False` computes the plain Pearlmutter product, without
    the θ-specific layers."""
    entered: list[int] = []
    real_layers = hvp_module.theta_layers

    @contextmanager
    def counted(params: list[nn.Parameter]) -> Iterator[None]:
        entered.append(1)
        with real_layers(params):
            yield

    monkeypatch.setattr(hvp_module, "theta_layers", counted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = models.classification_batches((4, 8), 4, 1, seed=0)
    settings: dict[str, Any] = (
        {"target_metric": "sparsity", "target": 0.5, "steps": 1}
        if granularity == "unstructured"
        else {}
    )
    config = PruneConfig(granularity=granularity, theta_shortcut=theta_shortcut, **settings)

    prune_(model, batches[0][0], batches, models.cross_entropy, config)

    assert bool(entered) is theta_shortcut


def test_a_conv_mask_is_judged_along_its_input_channels() -> None:
    """A (out, in, kh, kw) mask keeping two of every four input channels is valid; one keeping
    two of every four along the kernel width only is not."""
    generator = torch.Generator().manual_seed(0)

    def two_of_every_four(*shape: int) -> Tensor:
        """(…, n) with two of every four consecutive entries of the last axis kept."""
        blocks = torch.rand(*shape[:-1], shape[-1] // 4, 4, generator=generator)
        return (blocks.argsort(dim=-1) < 2).reshape(shape)

    # (out, kh, kw, in) -> (out, in, kh, kw)
    along_inputs = two_of_every_four(4, 3, 3, 8).movedim(-1, 1)
    along_kernel_width = two_of_every_four(4, 8, 3, 4)  # (out, in, kh, kw)

    assert is_valid_n_m(along_inputs, in_axis=1)
    assert not is_valid_n_m(along_kernel_width, in_axis=1)
