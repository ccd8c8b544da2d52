"""Depth pruning: the block-removal estimator against measured loss changes, and whole-block
removal that configs, reloads and plans agree on."""

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.engine import hf_models
from tests.engine.hf_models import (
    assert_reloads_identically,
    causal_lm_loss,
    classification_loss,
    lm_batches,
    text_batches,
)
from worker.engine import PruneConfig, prune_
from worker.engine.blocks import remove_blocks_
from worker.engine.depth import block_influence, block_scores, transformer_blocks
from worker.engine.plan import Plan, apply_plan_


def _llama(family: str = "llama") -> nn.Module:
    return hf_models.grouped_query_lm(family, layers=4)


def _count(blocks: Any) -> int:
    return len(blocks)


def _inputs(seed: int) -> dict[str, Any]:
    return {"input_ids": lm_batches(1, seed)[0]["input_ids"], "use_cache": False}


def _loss(model: nn.Module, batches: list[dict[str, Any]]) -> float:
    with torch.no_grad():
        return sum(float(causal_lm_loss(model, b)) for b in batches) / len(batches)


def test_estimator_predicts_the_measured_loss_change_of_removing_each_block() -> None:
    model = _llama().double()
    for block in model.model.layers:  # small block contributions: second order is accurate
        block.self_attn.o_proj.weight.data *= 0.2
        block.mlp.down_proj.weight.data *= 0.2
    batches = lm_batches(3, 0)
    found = transformer_blocks(model)
    assert found is not None
    name, blocks = found

    predicted = block_scores(model, blocks, batches, causal_lm_loss, "oba_full")
    base = _loss(model, batches)
    measured = []
    for index in range(len(blocks)):
        trial = copy.deepcopy(model)
        remove_blocks_(trial, name, [index])
        measured.append(_loss(trial, batches) - base)

    measured_t = torch.tensor(measured, dtype=torch.float64)
    torch.testing.assert_close(predicted, measured_t, rtol=0.1, atol=1e-4)
    assert torch.equal(predicted.argsort(), measured_t.argsort())


def test_block_influence_is_one_minus_the_cosine_of_each_blocks_input_and_output() -> None:
    model = _llama().double()
    batches = lm_batches(2, 0)
    batches[1]["attention_mask"] = torch.ones_like(batches[1]["input_ids"])
    batches[1]["attention_mask"][:, -3:] = 0  # padding: not counted
    found = transformer_blocks(model)
    assert found is not None

    influence = block_influence(model, found[1], batches, causal_lm_loss)

    # the oracle: hidden_states[i] enters block i and hidden_states[i + 1] leaves it (the last
    # one is after the final norm, so the last block is left out)
    total = torch.zeros(3, dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            states = model(**batch, output_hidden_states=True).hidden_states
            keep = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
            for i in range(3):
                cosine = nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1)
                total[i] += (1 - cosine)[keep].sum()
            tokens += int(keep.sum())
    torch.testing.assert_close(influence[:3], total / tokens)


def test_influence_removes_the_block_that_turns_the_stream_least() -> None:
    model = _llama()
    with torch.no_grad():  # block 2 adds almost nothing: its output is nearly its input
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-3)
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
        model.model.layers[1].mlp.down_proj.weight.mul_(10)  # block 1 turns it most
    found = transformer_blocks(model)
    assert found is not None
    originals = list(found[1])
    config = PruneConfig(granularity="layer", target=0.8, steps=1, block_score="influence")

    prune_(model, _inputs(0), lm_batches(2, 0), causal_lm_loss, config)

    assert [originals.index(b) for b in found[1]] == [0, 1, 3]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_layer_granularity_removes_blocks_and_reloads(family: str, tmp_path: Path) -> None:
    model = _llama(family)
    original = copy.deepcopy(model)
    result = prune_(
        model,
        _inputs(0),
        lm_batches(2, 0),
        causal_lm_loss,
        PruneConfig(method="oba_full", granularity="layer", target=0.6, steps=1),
    )

    assert model.config.num_hidden_layers == _count(model.model.layers) < 4
    assert result.macs <= 0.6 * result.initial_macs
    if family == "qwen2":
        assert _count(model.config.layer_types) == _count(model.model.layers)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(
        range(_count(model.model.layers))
    )
    rebuilt = apply_plan_(original, _inputs(0), Plan.from_json(result.plan.to_json()))
    rebuilt.load_state_dict(model.state_dict())
    assert_reloads_identically(model, tmp_path, _inputs(3), rebuilt.eval())


def test_depth_and_width_combine_in_one_run(tmp_path: Path) -> None:
    model = _llama()
    result = prune_(
        model,
        _inputs(0),
        lm_batches(2, 0),
        causal_lm_loss,
        PruneConfig(method="oba_full", target=0.5, steps=2, depth_share=0.5, global_ranking=False),
    )

    # depth stops at the block count nearest target^0.5 (in log space) and widths do the rest
    assert _count(model.model.layers) == 3
    assert result.config_updates["intermediate_size"] < 48
    assert result.macs <= 0.5 * result.initial_macs
    assert_reloads_identically(model, tmp_path, _inputs(3))


def test_bert_drops_encoder_layers() -> None:
    torch.manual_seed(0)
    model = hf_models.bert(layers=3).eval()
    batches = text_batches(2, 0)
    prune_(
        model,
        {"input_ids": batches[0]["input_ids"][:1]},
        batches,
        classification_loss,
        PruneConfig(method="oba_full", granularity="layer", target=0.8, steps=1),
    )

    assert model.config.num_hidden_layers == _count(model.bert.encoder.layer) == 2
