"""An FFN whose width the class fixes (BLOOM's 4 × hidden_size, `Family.fixed_ffn`): no config
field states a narrower one, so per-layer widths (global ranking: the onnx, pt2 and
safetensors outputs) prune its neurons alone and the plan replays them on the original, while
uniform widths (an `hf` output) narrow it with the hidden size, four neurons per channel, and
every head's size with it (`derived_hidden`), so that `from_pretrained` rebuilds the model."""

import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers import BloomForCausalLM

from tests.engine.hf_models import causal_lm_loss
from tests.worker.family_zoo import FAMILIES, lm_inputs
from worker.engine import PruneConfig, prune_
from worker.engine.architectures import fixed_ffn_layers
from worker.engine.head_dims import FusedHeadDims, head_dim_layers
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


def test_uniform_widths_move_the_ffn_with_the_hidden_size_and_reload(tmp_path: Path) -> None:
    model = _bloom()
    uniform = PruneConfig(method="oba", target=0.5, steps=2, global_ranking=False)
    assert reachable_fraction(model, lm_inputs(0), uniform) < 0.5

    result = prune_(model, lm_inputs(0), [lm_inputs(0), lm_inputs(1)], causal_lm_loss, uniform)

    assert result.macs <= 0.5 * result.initial_macs
    hidden = result.config_updates["hidden_size"]
    assert hidden < 64 and hidden % 4 == 0  # every one of the 4 heads loses as many dimensions
    assert _widths(model) == [4 * hidden, 4 * hidden]
    assert {a.head_dim for a in head_dim_layers(model)} == {hidden // 4}
    model.save_pretrained(tmp_path)
    reloaded = BloomForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model(**lm_inputs(3)).logits
        torch.testing.assert_close(reloaded(**lm_inputs(3)).logits, expected, rtol=0, atol=1e-5)


def test_removing_head_dimensions_folds_the_new_logit_scale_into_the_queries() -> None:
    """BLOOM's fused projection holds each head's query, key and value dimensions in turn:
    removing dimension j of head h is the same function as silencing its q·k term and its
    value's way out, once the query carries the new logits' scale."""
    [first, *_] = head_dim_layers(_bloom())
    assert isinstance(first, FusedHeadDims)
    owner, d = first.owner, first.head_dim
    with torch.no_grad():  # logits large enough that their scale shows in the softmax
        owner.query_key_value.weight.mul_(30)
    silenced = copy.deepcopy(owner)
    removed = [[0], [3], [d - 1], [5]]  # one dimension of each of the 4 heads
    for head, [j] in enumerate(removed):
        silenced.query_key_value.weight.data[head * 3 * d + j] = 0
        silenced.query_key_value.bias.data[head * 3 * d + j] = 0
        silenced.dense.weight.data[:, head * d + j] = 0

    first.remove_dims_(removed)

    assert first.head_dim == d - 1 and owner.inv_norm_factor == (d - 1) ** -0.5
    assert owner.query_key_value.out_features == 3 * 4 * (d - 1)
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    alibi = torch.randn(2 * 4, 1, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = silenced(hidden, hidden, alibi, None)[0]
        torch.testing.assert_close(
            owner(hidden, hidden, alibi, None)[0], expected, atol=1e-5, rtol=0
        )


def test_a_family_whose_config_states_the_width_names_no_fixed_ffn() -> None:
    """GPT-NeoX names the same up-projection, but `intermediate_size` states its width."""
    assert fixed_ffn_layers(FAMILIES["gpt_neox"].build()) == []
