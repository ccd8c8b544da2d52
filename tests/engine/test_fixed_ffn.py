"""An FFN whose width the class fixes (BLOOM's 4 × hidden_size, `Family.fixed_ffn`): no config
field states a narrower one, so per-layer widths (global ranking: the onnx, pt2 and
safetensors outputs) prune its neurons and the plan replays them on the original, while
uniform widths (an `hf` output) keep it and the refusal says why and what the others reach."""

import json

import pytest
import torch
from torch import nn

from tests.engine.hf_models import causal_lm_loss
from tests.worker.family_zoo import FAMILIES, lm_inputs
from worker.engine import PruneConfig, TargetUnreachable, prune_
from worker.engine.architectures import fixed_ffn_layers
from worker.engine.plan import Plan, apply_plan_
from worker.engine.prune import reachable_fraction


def _bloom() -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES["bloom"].build().eval()


def _widths(model: nn.Module) -> list[int]:
    return [m.out_features for m in fixed_ffn_layers(model) if isinstance(m, nn.Linear)]


def test_per_layer_widths_prune_the_ffn_to_half_and_the_plan_replays() -> None:
    model = _bloom()
    qkv = {n: m.weight.shape for n, m in model.named_modules() if n.endswith("query_key_value")}

    result = prune_(
        model,
        lm_inputs(0),
        [lm_inputs(0), lm_inputs(1)],
        causal_lm_loss,
        PruneConfig(method="oba", target=0.5, steps=2, global_ranking=True),
    )

    assert result.macs <= 0.5 * result.initial_macs
    assert len(set(_widths(model))) == 2 and max(_widths(model)) < 4 * 64  # per layer
    # heads (their ALiBi slopes come from the count) and the hidden size stay; no config
    # field moved
    assert qkv == {n: m.weight.shape for n, m in model.named_modules() if n in qkv}
    assert result.config_updates == {}
    # the safetensors output: the plan on a fresh original takes the pruned weights as they are
    plan = Plan.from_json(json.loads(json.dumps(result.plan.to_json())))
    rebuilt = apply_plan_(_bloom(), lm_inputs(0), plan)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        expected = model(**lm_inputs(3)).logits
        torch.testing.assert_close(rebuilt(**lm_inputs(3)).logits, expected, rtol=0, atol=1e-5)


def test_uniform_widths_keep_the_ffn_and_say_why_and_what_per_layer_widths_reach() -> None:
    model = _bloom()
    uniform = PruneConfig(method="oba", target=0.5, steps=2, global_ranking=False)
    assert reachable_fraction(model, lm_inputs(0), uniform) == 1.0

    with pytest.raises(TargetUnreachable) as refused:
        prune_(model, lm_inputs(0), [lm_inputs(0)], causal_lm_loss, uniform)

    message = str(refused.value)
    assert refused.value.per_layer is not None and refused.value.per_layer <= 0.5
    assert "\n" not in message
    assert "BloomForCausalLM builds its FFN at 4 × hidden_size whatever the config says" in message
    assert f"safetensors output (per-layer widths) {refused.value.per_layer:.4f} is" in message
    assert _widths(model) == [4 * 64, 4 * 64]  # refused before anything was pruned


def test_a_family_whose_config_states_the_width_names_no_fixed_ffn() -> None:
    """GPT-NeoX names the same up-projection, but `intermediate_size` states its width."""
    assert fixed_ffn_layers(FAMILIES["gpt_neox"].build()) == []
