"""A pruning plan rebuilds the pruned module from the original architecture."""

import copy
import json

import torch

from tests.engine import hf_models, models
from worker.engine import PruneConfig, prune_
from worker.engine.plan import Plan, apply_plan_


def test_plan_rebuilds_a_pruned_cnn() -> None:
    torch.manual_seed(0)
    model = models.ResidualCNN(width=16, in_channels=3)
    original = copy.deepcopy(model)
    calibration = models.classification_batches((8, 3, 8, 8), 3, 2, seed=0)
    result = prune_(
        model,
        calibration[0][0],
        calibration,
        models.cross_entropy,
        PruneConfig(target=0.5, steps=2),
    )

    plan = Plan.from_json(json.loads(json.dumps(result.plan.to_json())))
    rebuilt = apply_plan_(original, calibration[0][0], plan)
    rebuilt.load_state_dict(model.state_dict())

    assert plan.history
    torch.testing.assert_close(rebuilt.eval()(calibration[1][0]), model.eval()(calibration[1][0]))


def test_plan_rebuilds_a_bert_with_pruned_heads() -> None:
    torch.manual_seed(0)
    model = hf_models.bert().eval()
    original = copy.deepcopy(model)
    batches = hf_models.text_batches(2, 0)
    inputs = hf_models.inputs_of(batches[0])
    result = prune_(
        model,
        inputs,
        batches,
        hf_models.classification_loss,
        PruneConfig(method="oba_full", target=0.5, steps=2),
    )

    rebuilt = apply_plan_(original, inputs, Plan.from_json(result.plan.to_json()))
    rebuilt.load_state_dict(model.state_dict())

    assert result.plan.heads and min(result.plan.heads.values()) < 4
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**inputs).logits, model(**inputs).logits)
