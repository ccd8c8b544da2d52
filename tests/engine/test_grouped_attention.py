"""Grouped-query attention: whole key/value groups pruned, configs kept consistent, reloadable."""

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.engine.hf_models import (
    assert_reloads_identically,
    causal_lm_loss,
    grouped_query_lm,
    lm_batches,
)
from worker.engine import InvalidConfig, PruneConfig, prune_
from worker.engine.kv_groups import grouped_attention_layers, remove_kv_groups_
from worker.engine.plan import Plan, apply_plan_

# every family transformers ships with q_proj/k_proj/v_proj/o_proj and a head_dim in its config
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2"]


def _model(family: str) -> nn.Module:
    return grouped_query_lm(family)


def _inputs(seed: int) -> dict[str, Any]:
    return {"input_ids": lm_batches(1, seed)[0]["input_ids"], "use_cache": False}


def test_removing_a_kv_group_equals_silencing_its_query_heads() -> None:
    model = _model("llama")
    reference = copy.deepcopy(model)
    layer = grouped_attention_layers(model)[0]
    # kv head 1 is read by query heads 2 and 3: their o_proj input columns 16..31
    reference.model.layers[0].self_attn.o_proj.weight.data[:, 16:32] = 0

    remove_kv_groups_(layer, [1])

    assert (layer.kv_heads, layer.heads) == (1, 2)
    assert layer.o.in_features == layer.q.out_features == 16
    with torch.no_grad():
        torch.testing.assert_close(
            model(**_inputs(1)).logits, reference(**_inputs(1)).logits, rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_prunes_kv_groups_and_reloads_with_identical_outputs(family: str, tmp_path: Path) -> None:
    model = _model(family)
    original = copy.deepcopy(model)
    batches = lm_batches(2, 0)
    result = prune_(
        model,
        _inputs(0),
        batches,
        causal_lm_loss,
        PruneConfig(method="oba", target=0.6, steps=1, global_ranking=False, hidden_size=False),
    )

    layers = grouped_attention_layers(model)
    assert {(layer.heads, layer.kv_heads) for layer in layers} == {(2, 1)}
    assert result.config_updates["num_key_value_heads"] == 1
    assert result.config_updates["num_attention_heads"] == 2
    rebuilt = apply_plan_(original, _inputs(0), Plan.from_json(result.plan.to_json()))
    rebuilt.load_state_dict(model.state_dict())
    assert_reloads_identically(model, tmp_path, _inputs(3), rebuilt.eval())


@pytest.mark.parametrize(("family", "tied"), [("llama", False), ("qwen3", True)])
def test_prunes_the_hidden_size_and_reloads(family: str, tied: bool, tmp_path: Path) -> None:
    model = _model(family)
    model.config.tie_word_embeddings = tied
    model.tie_weights()
    result = prune_(
        model,
        _inputs(0),
        lm_batches(2, 0),
        causal_lm_loss,
        PruneConfig(method="oba", target=0.5, steps=2, global_ranking=False),
    )

    hidden = result.config_updates["hidden_size"]
    assert hidden < 32 and hidden % 4 == 0  # transformers requires a multiple of the heads
    assert model.model.embed_tokens.embedding_dim == model.model.norm.weight.numel() == hidden
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert_reloads_identically(model, tmp_path, _inputs(3))


def test_gemma_keeps_its_hidden_size() -> None:
    """Gemma scales embeddings by √hidden_size at construction: a pruned hidden size would
    reload as a different function, so the default leaves it alone and asking for it fails."""
    model = _model("gemma")
    result = prune_(
        model, _inputs(0), lm_batches(2, 0), causal_lm_loss, PruneConfig(target=0.7, steps=1)
    )
    assert "hidden_size" not in result.config_updates
    with pytest.raises(InvalidConfig, match="scaled"):
        prune_(
            model,
            _inputs(0),
            lm_batches(2, 0),
            causal_lm_loss,
            PruneConfig(target=0.7, steps=1, hidden_size=True),
        )
