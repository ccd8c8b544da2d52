"""PruneConfig is plain data, and the in-place entry point's old name still works for a release."""

import json

import pytest

from tests.engine import models
from worker.engine import InvalidConfig, PruneConfig, prune


def test_a_config_round_trips_through_json() -> None:
    config = PruneConfig(
        method="oba_full",
        target=0.4,
        ignored_layers=("head",),
        attention_heads={"attn.qkv": 4},
        depth_share=0.3,
        theta_shortcut=False,
    )

    assert PruneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(InvalidConfig, match="finetune"):
        PruneConfig.from_dict({"target": 0.5, "finetune": "not data"})


def test_the_old_name_prunes_in_place_and_says_it_is_deprecated() -> None:
    model = models.mlp()
    batches = models.classification_batches((8, 6), 3, 2, seed=0)
    with pytest.warns(DeprecationWarning, match="prune_"):
        result = prune(model, batches[0][0], batches, models.cross_entropy, PruneConfig(steps=1))
    assert result.model is model
    assert result.macs < result.initial_macs
