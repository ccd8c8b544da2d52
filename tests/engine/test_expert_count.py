"""Whole routed experts (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE): removing one routes as a logit of
−∞ would, its score is the OBA unit score over all its parameters, a parameter target removes as
many in every layer (stated by the config, reloaded, replayed by the plan) and a MACs target
none."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.engine.hf_models import assert_reloads_identically, causal_lm_loss
from tests.worker.family_zoo import FAMILIES, lm_inputs
from worker.engine import PruneConfig, measure, prune_
from worker.engine.expert_count import ExpertCount, expert_counts
from worker.engine.plan import Plan, apply_plan_
from worker.engine.results import PruneResult

# the zoo's mixtures: 4 experts a layer, 2 a token, 64 hidden
COUNT_FIELDS = {
    "mixtral": "num_local_experts",
    "olmoe": "num_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
}


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family].build().eval()


def _never_routed_to(router: nn.Module, expert: int) -> Any:
    """A forward hook giving the router's outputs as they are with `expert`'s logit at −∞: the
    softmax over the logits, its top k, renormalised where the router renormalises."""

    def hook(module: Any, args: Any, output: tuple[Tensor, Tensor, Tensor]) -> Any:
        logits = output[0].clone()
        logits[:, expert] = -torch.inf
        probabilities = torch.softmax(logits.float(), dim=-1)
        top, indices = torch.topk(probabilities, module.top_k, dim=-1)
        if getattr(module, "norm_topk_prob", True):  # Mixtral always renormalises
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(output[1].dtype), indices

    return router.register_forward_hook(hook)


@pytest.mark.parametrize("family", list(COUNT_FIELDS))
def test_removing_an_expert_routes_as_a_logit_of_minus_infinity(family: str) -> None:
    model = _model(family)
    original = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    for layer, (count, routed) in enumerate(
        zip(expert_counts(model), expert_counts(reference), strict=True)
    ):
        expert = layer + 1  # another expert in each layer
        _never_routed_to(routed.router, expert)
        count.remove_experts_([expert])
        assert count.count == count.router.num_experts == count.experts.module.num_experts == 3
        assert tuple(count.router.weight.shape) == (3, 64)

    with torch.no_grad():
        expected = reference(**lm_inputs(1)).logits
        assert not torch.allclose(original(**lm_inputs(1)).logits, expected, atol=1e-3)
        torch.testing.assert_close(model(**lm_inputs(1)).logits, expected, rtol=0, atol=1e-5)


def test_an_experts_score_is_the_oba_unit_score_over_all_its_parameters() -> None:
    [count, *_] = expert_counts(_model("mixtral"))
    gate_up, down = count.experts.module.gate_up_proj, count.experts.module.down_proj
    router = count.router.weight
    generator = torch.Generator().manual_seed(0)
    scores = {
        p: torch.randn(p.shape, generator=generator, dtype=torch.float64)
        for p in (gate_up, down, router)
    }
    # (parameters, experts): each parameter's sum over each expert's slice
    signed = torch.stack([s.reshape(4, -1).sum(1) for s in scores.values()]).sum(0)
    squares = torch.stack([(s**2).reshape(4, -1).sum(1) for s in scores.values()]).sum(0)

    # the 3 lowest of 4: the best expert is no unit, so at least top_k = 2 stay
    ranked = count.rank_(scores, "oba")
    torch.testing.assert_close(ranked, signed.abs().sort().values[:3])
    magnitude = count.rank_(scores, "magnitude")
    torch.testing.assert_close(magnitude, squares.sqrt().sort().values[:3])
    assert count.remove_([0]) == [int(squares.sqrt().argmin())]


def test_an_expert_saves_its_parameters_and_only_its_router_rows_macs() -> None:
    model = _model("mixtral")
    [count, *_] = expert_counts(model)
    # gate, up and down: 3 × 64 × 176; a router row: 64
    assert count.costs({}, "params").tolist() == [3 * 64 * 176 + 64] * 3
    router_macs = measure(model, lm_inputs(0)).module_macs[count.router]
    assert router_macs == 48 * 64 * 4  # 48 tokens, 4 experts: a small fraction of a layer
    assert count.costs({count.router: router_macs}, "macs").tolist() == [48 * 64] * 3


def _pruned(model: nn.Module, **config: Any) -> PruneResult:
    return prune_(
        model,
        lm_inputs(0),
        [lm_inputs(0), lm_inputs(1)],
        causal_lm_loss,
        PruneConfig(method="oba", steps=2, **config),
    )


def _replayed(original: nn.Module, plan: Plan, pruned: nn.Module) -> nn.Module:
    """The original rebuilt by the plan (through JSON), with the pruned weights (strictly)."""
    rebuilt = apply_plan_(
        original, lm_inputs(0), Plan.from_json(json.loads(json.dumps(plan.to_json())))
    )
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    return rebuilt.eval()


@pytest.mark.parametrize("family", list(COUNT_FIELDS))
def test_a_parameter_target_removes_as_many_experts_in_every_layer_and_reloads(
    family: str, tmp_path: Path
) -> None:
    model = _model(family)
    original = copy.deepcopy(model)
    before = measure(model, lm_inputs(0)).params
    result = _pruned(model, target_metric="params", target=0.5, global_ranking=False)

    counts = {count.count for count in expert_counts(model)}
    assert len(counts) == 1
    kept = counts.pop()
    assert 2 <= kept < 4
    field = COUNT_FIELDS[family]
    assert result.config_updates[field] == getattr(model.config, field) == kept
    assert model.num_experts == kept  # its load-balancing loss reads it
    assert measure(model, lm_inputs(0)).params <= 0.5 * before
    assert result.plan.expert_count_removals
    assert_reloads_identically(
        model, tmp_path, lm_inputs(3), _replayed(original, result.plan, model)
    )


def test_per_layer_counts_keep_top_k_experts_and_replay_their_plan() -> None:
    model = _model("mixtral")
    original = copy.deepcopy(model)
    result = _pruned(model, target_metric="params", target=0.3, global_ranking=True)

    assert all(count.count >= 2 for count in expert_counts(model))
    rebuilt = _replayed(original, result.plan, model)
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt(**lm_inputs(3)).logits, model(**lm_inputs(3)).logits, rtol=0, atol=1e-5
        )


def test_a_plan_of_neurons_then_experts_replays_whole_experts_first() -> None:
    model = _model("mixtral")
    original = copy.deepcopy(model)
    neurons = _pruned(model, target_metric="macs", target=0.8, global_ranking=False)
    experts = _pruned(model, target_metric="params", target=0.6, global_ranking=False)
    assert neurons.plan.expert_removals and experts.plan.expert_count_removals

    rebuilt = _replayed(original, neurons.plan.then(experts.plan), model)

    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt(**lm_inputs(3)).logits, model(**lm_inputs(3)).logits, rtol=0, atol=1e-5
        )


def test_a_macs_target_removes_no_expert() -> None:
    model = _model("mixtral")
    result = _pruned(model, target_metric="macs", target=0.6, global_ranking=False)

    assert [count.count for count in expert_counts(model)] == [4, 4]
    assert not result.plan.expert_count_removals
    assert "num_local_experts" not in result.config_updates
    assert result.plan.expert_removals  # the experts' neurons went instead


def test_expert_counts_pair_each_layers_experts_with_its_router() -> None:
    model = _model("qwen2_moe")  # its shared expert's gate is no router: one output
    found = expert_counts(model)
    assert [type(c.router).__name__ for c in found] == ["Qwen2MoeTopKRouter"] * 2
    assert all(isinstance(c, ExpertCount) and c.removable == 3 for c in found)
