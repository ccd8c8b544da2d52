"""Attention whose heads must stay keeps them, out of Torch-Pruning's graph, and the rest of the
model prunes per layer:
- Phi and StableLM rotate part of each head: the dependency search through the forward's slices
  and concatenations did not end (over 25 minutes on the zoo's 2-layer Phi), so a job with
  per-layer outputs never finished;
- Swin adds a relative position bias with one column per head, outside the graph: removing a
  head broke the forward pass (`unsupported_model`)."""

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.engine.hf_models import causal_lm_loss
from tests.worker.family_zoo import FAMILIES, lm_inputs
from worker.engine import PruneConfig, architectures, prune_


def _image_inputs(seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(4, 3, 16, 16, generator=generator),
        "labels": torch.randint(0, 2, (4,), generator=generator),
    }


def _image_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])


CASES: dict[str, tuple[Any, Any]] = {
    "phi": (lm_inputs, causal_lm_loss),
    "stablelm": (lm_inputs, causal_lm_loss),
    "swin": (_image_inputs, _image_loss),
}


def _attentions(model: nn.Module) -> list[Any]:
    return [
        m for m in model.modules() if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj"))
    ]


@pytest.mark.parametrize("name", CASES)
def test_attention_whose_heads_stay_is_out_of_the_graph(name: str) -> None:
    model = FAMILIES[name].build()

    layers, frozen = architectures.attention_layers(model, {})

    assert _attentions(model) and not layers
    projections = {id(m) for a in _attentions(model) for m in (a.q_proj, a.k_proj, a.v_proj)}
    assert projections <= {id(m) for m in frozen}


@pytest.mark.parametrize("name", CASES)
def test_per_layer_pruning_reaches_half_and_keeps_every_head(name: str) -> None:
    inputs, loss = CASES[name]
    torch.manual_seed(0)
    model = FAMILIES[name].build().eval()
    heads = [a.q_proj.out_features for a in _attentions(model)]

    result = prune_(
        model,
        inputs(0),
        [inputs(0), inputs(1)],
        loss,
        PruneConfig(method="oba", target=0.5, steps=2, global_ranking=True),
    )

    assert result.macs <= 0.5 * result.initial_macs
    assert [a.q_proj.out_features for a in _attentions(model)] == heads
    with torch.no_grad():
        assert torch.isfinite(loss(model, inputs(2)))
