"""Honest targets: the least reachable fraction is computed first, and a lower target refused."""

import sys
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from tests.engine import hf_models
from tests.engine.hf_models import classification_loss, text_batches
from worker.engine import PruneConfig, TargetUnreachable, prune_, reachable_fraction, structured

prune_module = sys.modules["worker.engine.prune"]  # the module, not the function of its name


def _bert() -> nn.Module:
    """The issue's case: hidden 64, FFN 128, 4 heads. A config cannot state BERT's pruned
    heads, so uniform (hf) widths prune FFN neurons only, which cannot halve the MACs."""
    torch.manual_seed(0)
    return hf_models.bert(hidden=64, intermediate=128).eval()


INPUTS = {"input_ids": text_batches(1, 0)[0]["input_ids"][:1]}


def test_uniform_widths_cannot_halve_a_bert_and_say_how_far_they_go() -> None:
    model = _bert()
    uniform = PruneConfig(target=0.5, global_ranking=False)
    reachable = reachable_fraction(model, INPUTS, uniform)
    assert 0.5 < reachable < 1.0
    assert reachable_fraction(model, INPUTS, PruneConfig(target=0.5)) < 0.5  # heads too

    weights = [p.clone() for p in model.parameters()]
    with pytest.raises(TargetUnreachable) as raised:
        prune_(model, INPUTS, text_batches(2, 0), classification_loss, uniform)

    assert raised.value.code == "target_unreachable"
    assert raised.value.reachable == reachable
    assert f"{reachable:.4f}" in str(raised.value)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_a_target_at_the_reachable_value_is_met() -> None:
    model = _bert()
    config = PruneConfig(target=0.5, global_ranking=False)
    reachable = reachable_fraction(model, INPUTS, config)
    result = prune_(
        model,
        INPUTS,
        text_batches(2, 0),
        classification_loss,
        PruneConfig(target=reachable + 1e-3, global_ranking=False, steps=2),
    )
    assert result.target_met
    assert result.macs <= (reachable + 1e-3) * result.initial_macs


def test_depth_reachable_keeps_one_block() -> None:
    model = _bert()
    depth = PruneConfig(target=0.1, granularity="layer")
    one_block = reachable_fraction(model, INPUTS, depth)
    with pytest.raises(TargetUnreachable):
        prune_(model, INPUTS, text_batches(2, 0), classification_loss, depth)
    assert 0.1 < one_block < 1.0


def _record(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[float]:
    """Every value `module.name` returns from now on, in the list returned."""
    values: list[float] = []
    original = getattr(module, name)

    def recorded(*args: Any) -> float:
        values.append(original(*args))
        return values[-1]

    monkeypatch.setattr(module, name, recorded)
    return values


@pytest.mark.parametrize("global_ranking", [True, False])
@pytest.mark.parametrize("name", list(hf_models.CASES))
def test_the_cheap_bound_is_never_below_the_measured_reachable_fraction(
    name: str, global_ranking: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    build, make_batches, loss = hf_models.CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    batch = make_batches(1, 0)[0]
    inputs = hf_models.inputs_of(
        {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    )
    config = PruneConfig(target=0.95, steps=1, global_ranking=global_ranking)
    exact = reachable_fraction(model, inputs, config)
    bounds = _record(monkeypatch, structured, "reachable_bound")
    prune_(model, inputs, make_batches(1, 0), loss, config)

    assert len(bounds) == 1
    assert exact - 1e-9 <= bounds[0] < 1.0  # a bound, and one that says something


def test_the_copy_is_pruned_only_for_a_target_under_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    measured = _record(monkeypatch, prune_module, "reachable_fraction")
    config = PruneConfig(target=0.9, global_ranking=True, steps=1)
    prune_(_bert(), INPUTS, text_batches(1, 0), classification_loss, config)
    assert measured == []  # 0.9 is over the bound: nothing to measure

    with pytest.raises(TargetUnreachable):
        prune_(
            _bert(), INPUTS, text_batches(1, 0), classification_loss, replace(config, target=0.01)
        )
    assert len(measured) == 1
