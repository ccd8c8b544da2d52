"""Honest targets: the least reachable fraction is computed first, and a lower target refused."""

import pytest
import torch
from torch import nn

from tests.engine import hf_models
from tests.engine.hf_models import classification_loss, text_batches
from worker.engine import PruneConfig, TargetUnreachable, prune_, reachable_fraction


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
