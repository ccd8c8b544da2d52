"""FFNs whose gate and up projections are one layer (Phi-3, ModernBERT): neuron j is rows j and
I + j of the fused layer and column j of the down projection, pruned together and stated back
as `intermediate_size`."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.engine.hf_models import assert_reloads_identically, causal_lm_loss
from tests.worker.family_zoo import FAMILIES, lm_inputs
from worker.engine import PruneConfig, prune_
from worker.engine.fused_ffn import fused_ffn_layers
from worker.engine.plan import Plan, apply_plan_


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name].build().eval()


@pytest.mark.parametrize("name", ["phi3", "modernbert"])
def test_removing_a_neuron_equals_silencing_its_down_projection_column(name: str) -> None:
    model = _model(name)
    reference = copy.deepcopy(model)
    [first, *_] = fused_ffn_layers(model)
    [silenced, *_] = fused_ffn_layers(reference)
    width = first.width
    silenced.down.weight.data[:, [3, width - 1]] = 0

    first.remove_([3, width - 1])

    assert (first.width, first.up.out_features, first.down.in_features) == (
        width - 2,
        2 * (width - 2),
        width - 2,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model(**lm_inputs(1)).logits, reference(**lm_inputs(1)).logits, rtol=0, atol=1e-6
        )


def test_phi3_prunes_its_fused_ffn_states_the_width_and_replays_its_plan(tmp_path: Path) -> None:
    model = _model("phi3")
    original = copy.deepcopy(model)
    result = prune_(
        model,
        lm_inputs(0),
        [lm_inputs(0), lm_inputs(1)],
        causal_lm_loss,
        PruneConfig(method="oba", target=0.6, steps=2, global_ranking=False, hidden_size=False),
    )

    widths = {f.width for f in fused_ffn_layers(model)}
    assert len(widths) == 1 and widths.pop() == result.config_updates["intermediate_size"] < 176
    assert result.plan.ffn_removals  # what the plan replays
    rebuilt = apply_plan_(original, lm_inputs(0), Plan.from_json(result.plan.to_json()))
    rebuilt.load_state_dict(model.state_dict())
    assert_reloads_identically(model, tmp_path, lm_inputs(3), rebuilt.eval())
