"""Routed experts (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE): each expert's FFN width, pruned to one
width for all, scored within each expert, counted in MACs and replayed by the plan."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.engine.hf_models import assert_reloads_identically, causal_lm_loss
from tests.worker.family_zoo import FAMILIES, lm_inputs
from worker.engine import PruneConfig, measure, prune_
from worker.engine.allocation import (
    UnitScoring,
    lamp_normalised,
    lamp_rank_sum_values,
    lamp_weight_values,
)
from worker.engine.experts import expert_layers
from worker.engine.plan import Plan, apply_plan_


def _mixtral() -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES["mixtral"].build().eval()


def test_removing_neurons_equals_silencing_their_down_columns_expert_by_expert() -> None:
    model = _mixtral()
    reference = copy.deepcopy(model)
    [experts, *_] = expert_layers(model)
    [silenced, *_] = expert_layers(reference)
    # different neurons in each expert, 8 of each (widths stay multiples of 8: `experts`)
    removed = [list(range(expert, 176, 22)) for expert in range(4)]
    for expert, neurons in enumerate(removed):
        silenced.module.down_proj.data[expert][:, neurons] = 0

    experts.remove_neurons_(removed)

    assert experts.width == 168
    assert tuple(experts.module.gate_up_proj.shape) == (4, 2 * 168, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**lm_inputs(1)).logits, reference(**lm_inputs(1)).logits, rtol=0, atol=1e-5
        )


def test_a_rank_removes_each_experts_least_important_neuron() -> None:
    model = _mixtral()
    [experts, *_] = expert_layers(model)
    gate_up, down = experts.module.gate_up_proj, experts.module.down_proj
    scores = {gate_up: torch.ones_like(gate_up), down: torch.ones_like(down)}
    for expert, weakest in enumerate([7, 0, 42, 175]):  # one neuron of each scores nothing
        scores[gate_up][expert, [weakest, 176 + weakest]] = 0
        scores[down][expert][:, weakest] = 0
    kept_down = [
        torch.cat([down.data[e][:, :w], down.data[e][:, w + 1 :]], 1)
        for e, w in enumerate([7, 0, 42, 175])
    ]

    per_rank = experts.rank_(scores, "oba")
    assert per_rank[0] == 0 and bool((per_rank[1:] > 0).all())
    removed = experts.remove_([0])

    assert removed == [[7], [0], [42], [175]]
    for expert, expected in enumerate(kept_down):
        torch.testing.assert_close(experts.module.down_proj.data[expert], expected)


def test_routed_experts_count_in_the_macs_in_proportion_to_their_width() -> None:
    model = _mixtral()
    before = measure(model, lm_inputs(0))
    experts = expert_layers(model)
    expert_macs = sum(before.module_macs[e.module] for e in experts)
    # 48 tokens, 2 experts each, 3 products of 64 × 176 per expert and token, 2 layers
    assert expert_macs == 48 * 2 * 3 * 64 * 176 * 2

    for layer in experts:
        layer.remove_neurons_([list(range(88))] * 4)

    after = measure(model, lm_inputs(0))
    assert before.macs - after.macs == expert_macs // 2


def test_mixtral_prunes_its_experts_states_the_width_and_replays_its_plan(
    tmp_path: Path,
) -> None:
    model = _mixtral()
    original = copy.deepcopy(model)
    result = prune_(
        model,
        lm_inputs(0),
        [lm_inputs(0), lm_inputs(1)],
        causal_lm_loss,
        PruneConfig(method="oba", target=0.6, steps=2, global_ranking=False),
    )

    widths = {layer.width for layer in expert_layers(model)}
    assert len(widths) == 1
    width = widths.pop()
    assert width == result.config_updates["intermediate_size"] < 176 and width % 8 == 0
    assert result.plan.expert_removals
    rebuilt = apply_plan_(original, lm_inputs(0), Plan.from_json(result.plan.to_json()))
    rebuilt.load_state_dict(model.state_dict())
    assert_reloads_identically(model, tmp_path, lm_inputs(3), rebuilt.eval())


@pytest.mark.parametrize(
    ("normalisation", "values"),
    [("lamp_weights", lamp_weight_values), ("lamp_rank_sum", lamp_rank_sum_values)],
)
def test_lamp_widths_prune_a_mixtral_ranking_its_experts_neurons_by_their_scores(
    normalisation: str, values: UnitScoring
) -> None:
    """The experts' neurons rank themselves (`ChannelGroup.scores`), so the rules of LAMP's
    widths value them by LAMP on their scores; the rest of the model by the weights' values."""
    model = _mixtral()
    group = expert_layers(model)[0].channel_group("experts")
    scores = torch.tensor([3.0, 1.0, 2.0] + [0.5] * (group.width - 3), dtype=torch.float64)
    torch.testing.assert_close(values(group, scores), lamp_normalised(group, scores))

    result = prune_(
        model,
        lm_inputs(0),
        [lm_inputs(0), lm_inputs(1)],
        causal_lm_loss,
        PruneConfig(method="oba", target=0.6, steps=2, normalisation=normalisation),
    )

    assert result.macs <= 0.6 * result.initial_macs
    assert torch.isfinite(causal_lm_loss(model, lm_inputs(3)))
