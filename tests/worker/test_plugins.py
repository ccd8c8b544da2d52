"""A scorer or an allocation rule is one registration: a package's entry point makes it a name a
job spec accepts (the API reads the name only) and the engine runs (the worker loads it)."""

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.jobs import vocabulary
from service.jobs.schemas import JobSpec
from tests.worker import factories
from worker.engine import ALLOCATIONS, METHODS, InvalidConfig, allocation, scores
from worker.pipeline import plugins
from worker.pipeline.steps import prune_config

PLUGIN = """
CALLS = []


def weight_size(model, params, batch, loss_fn, generator):
    CALLS.append("scorer")
    return [p.detach().abs() for p in params]


weight_size.needs_data = False


def max_rule_noted(groups, unit_scores, cost, excess, initial_units, config):
    CALLS.append("allocation")
    from worker.engine.allocation import registered_allocation

    return registered_allocation("max").rule(
        groups, unit_scores, cost, excess, initial_units, config
    )
"""
ENTRY_POINTS = """
[apoptosis.scorers]
weight_size = apoptosis_demo_plugin:weight_size

[apoptosis.allocations]
max_noted = apoptosis_demo_plugin:max_rule_noted
"""


def _forget_plugins() -> None:
    vocabulary.plugin_names.cache_clear()
    plugins.register_plugins.cache_clear()


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A package declaring a scorer and an allocation rule, installed as pip would (its module
    and its dist-info on the path), and the engine's registries as they were afterwards."""
    (tmp_path / "apoptosis_demo_plugin.py").write_text(PLUGIN)
    info = tmp_path / "apoptosis_demo_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: apoptosis-demo-plugin\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(scores, "_SCORERS", dict(scores._SCORERS))
    monkeypatch.setattr(allocation, "_ALLOCATIONS", dict(allocation._ALLOCATIONS))
    _forget_plugins()
    import apoptosis_demo_plugin  # type: ignore[import-not-found]

    yield apoptosis_demo_plugin
    _forget_plugins()


def test_a_plugins_scorer_and_allocation_rule_run_through_a_job_spec(
    installed_plugin: Any, tmp_path: Path
) -> None:
    spec = factories.spec(method="weight_size", normalisation="max_noted")

    result = factories.run_bert_job(tmp_path / "job", spec)

    assert {"scorer", "allocation"} <= set(installed_plugin.CALLS)
    assert result.macs_after <= 0.5 * result.macs_before


def test_a_spec_accepts_installed_names_only(installed_plugin: Any) -> None:
    assert vocabulary.methods() == (*vocabulary.BUILT_IN_METHODS, "weight_size")
    assert vocabulary.allocations() == (*vocabulary.BUILT_IN_ALLOCATIONS, "max_noted")
    with pytest.raises(ValidationError, match="unknown scoring method 'weight_sise'; expected"):
        factories.spec(method="weight_sise")
    with pytest.raises(ValidationError, match="unknown allocation rule 'lamb'; expected one of"):
        factories.spec(normalisation="lamb")


def test_the_spec_names_the_engines_built_ins() -> None:
    assert vocabulary.BUILT_IN_METHODS == METHODS
    assert vocabulary.BUILT_IN_ALLOCATIONS == ALLOCATIONS


GRID: dict[str, list[Any]] = {
    "method": list(vocabulary.BUILT_IN_METHODS),
    "granularity": ["channel", "layer", "unstructured", "2:4"],
    "normalisation": list(vocabulary.BUILT_IN_ALLOCATIONS),
    "target": [{"macs": 0.5}, {"params": 0.3}, {"sparsity": 0.5}, {"latency_ms": 5, "batch": 4}],
    "outputs": [["hf"], ["onnx", "safetensors"]],
    "hidden_size": [None, True, False],
    "depth_share": [0.0, 0.5],
    "schedule": [{"steps": 1, "kind": "linear"}, {"steps": 10, "kind": "exponential"}],
}


def test_every_valid_spec_on_a_grid_translates_to_an_engine_config() -> None:
    translated = 0
    for values in itertools.product(*GRID.values()):
        fields = dict(zip(GRID, values, strict=True))
        try:
            spec = JobSpec.model_validate({"model_id": "m", "dataset_id": "d", **fields})
        except ValidationError:
            continue
        try:
            # a latency target prunes in rounds, each to a fraction of the MACs it has then
            config = prune_config(spec, target=0.9 if spec.target.metric == "latency_ms" else None)
        except InvalidConfig as refused:
            pytest.fail(f"the spec {fields} is valid, but the engine refuses it: {refused}")
        assert (config.method, config.granularity, config.normalisation) == (
            spec.method,
            spec.granularity,
            spec.normalisation,
        )
        translated += 1
    assert translated > 1000  # most of the grid's 9,216 combinations are valid specs
