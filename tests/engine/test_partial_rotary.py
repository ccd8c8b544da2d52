"""Attention that rotates part of each head (Phi, StableLM) keeps its heads: Torch-Pruning's
dependency search through the forward's slices and concatenations did not end (over 25 minutes
on the zoo's 2-layer Phi), so a job with per-layer outputs never finished."""

import pytest
import torch

from tests.engine.hf_models import causal_lm_loss
from tests.worker.family_zoo import FAMILIES, lm_inputs
from worker.engine import PruneConfig, architectures, prune_


@pytest.mark.parametrize("name", ["phi", "stablelm"])
def test_partial_rotary_attention_stays_out_of_the_graph(name: str) -> None:
    model = FAMILIES[name].build()
    attentions = [layer.self_attn for layer in model.model.layers]

    layers, frozen = architectures.attention_layers(model, {})

    assert 0 < attentions[0].rotary_ndims < attentions[0].head_dim
    assert not layers
    assert {id(m) for a in attentions for m in (a.q_proj, a.k_proj, a.v_proj)} <= set(
        map(id, frozen)
    )


@pytest.mark.parametrize("name", ["phi", "stablelm"])
def test_per_layer_pruning_reaches_half_and_keeps_every_head(name: str) -> None:
    torch.manual_seed(0)
    model = FAMILIES[name].build().eval()
    heads = [layer.self_attn.q_proj.out_features for layer in model.model.layers]

    result = prune_(
        model,
        lm_inputs(0),
        [lm_inputs(0), lm_inputs(1)],
        causal_lm_loss,
        PruneConfig(method="oba", target=0.5, steps=2, global_ranking=True),
    )

    assert result.macs <= 0.5 * result.initial_macs
    assert [layer.self_attn.q_proj.out_features for layer in model.model.layers] == heads
    with torch.no_grad():
        assert torch.isfinite(model(**lm_inputs(2)).logits).all()
