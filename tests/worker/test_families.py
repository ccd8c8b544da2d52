"""Each family of `tests/worker/family_zoo.py`, uploaded as an `hf` folder and pruned by the job
with an `hf` output to half its MACs: either it gets there, the job's own reload check passes and
the output reloads with the family's class at the pruned size, or the job is refused before
anything is pruned, in one line that says what it can reach. Either way the job's row of
`docs/families.md` (`tests/worker/family_jobs.py`) must be what it did."""

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from service.jobs.results import JobResult
from tests.worker.family_jobs import documented, reload, row, run_job, stale_message
from tests.worker.family_zoo import FAMILIES
from worker.engine import TargetUnreachable, measure
from worker.engine.cost import run_forward
from worker.engine.families import FAMILIES as DESCRIBED
from worker.engine.plan import Plan, apply_plan_
from worker.pipeline import models

PRUNED = sorted(n for n, f in FAMILIES.items() if f.reaches <= 0.5)
REFUSED = sorted(n for n, f in FAMILIES.items() if f.reaches > 0.5)


def _model_type(name: str) -> str:
    return str(FAMILIES[name].build().config.model_type)


def test_every_described_family_is_in_the_zoo() -> None:
    assert set(DESCRIBED) - {"mt5", "umt5"} <= {_model_type(n) for n in FAMILIES}


def test_docs_families_lists_the_zoo() -> None:
    """Each row is held to its job in the tests below; a family added or removed shows here."""
    assert set(documented()) == set(FAMILIES), stale_message("its families")


def _marked(names: list[str]) -> list[Any]:
    return [pytest.param(n, marks=[pytest.mark.slow] * FAMILIES[n].slow) for n in names]


def _example_inputs(result: JobResult) -> dict[str, torch.Tensor]:
    return {
        k: torch.zeros(
            shape, dtype=torch.float if k in ("pixel_values", "input_features") else torch.long
        )
        for k, shape in result.example_inputs.items()
    }


@pytest.mark.parametrize("name", _marked(PRUNED))
def test_prunes_to_half_with_an_hf_output_that_reloads(tmp_path: Path, name: str) -> None:
    job = run_job(tmp_path, name)
    assert job.refusal is None, job.refusal
    assert job.result is not None
    result = job.result

    assert result.macs_after <= 0.5 * result.macs_before
    reload_diff = result.exports["hf"].relative_diff  # the job's own reload check
    assert reload_diff is not None and reload_diff <= 1e-4
    model = reload(job, tmp_path / "reloaded")
    reloaded = measure(model, _example_inputs(result))
    assert (reloaded.macs, reloaded.params) == (result.macs_after, result.params_after)
    assert row(job) == documented().get(name), stale_message(f"the row for {name}")


@pytest.mark.parametrize("name", _marked(REFUSED))
def test_is_refused_at_half_before_pruning_saying_what_it_can_reach(
    tmp_path: Path, name: str
) -> None:
    family = FAMILIES[name]
    job = run_job(tmp_path, name)
    assert job.refusal is not None, f"not refused: {row(job)}"

    assert "\n" not in str(job.refusal)
    if isinstance(job.refusal, TargetUnreachable):
        assert 0.5 < job.refusal.reachable <= family.reaches
        # why, and that the other outputs, with widths no config must state, get there
        assert job.refusal.why is not None and f"(with an hf output: {job.refusal.why})" in str(
            job.refusal
        )
        per_layer = job.refusal.per_layer
        assert per_layer is not None and per_layer <= 0.5
        other = f"onnx, pt2 or safetensors output (per-layer widths) {per_layer:.4f} is"
        assert other in str(job.refusal)
    else:  # the config states no width this family's pruning could move
        assert family.reaches == 1.0
        assert "choose safetensors, onnx or pt2" in str(job.refusal)
    assert row(job) == documented().get(name), stale_message(f"the row for {name}")


@pytest.mark.parametrize("name", _marked(REFUSED))
def test_prunes_to_half_with_a_safetensors_output_where_hf_is_refused(
    tmp_path: Path, name: str
) -> None:
    """The per-layer figure of the refusal is real: the job with a safetensors output (widths no
    config states) gets to half, and its plan, replayed on the original, takes the weights."""
    job = run_job(tmp_path, name, outputs=("safetensors",))
    assert job.refusal is None, job.refusal
    assert job.result is not None
    result = job.result

    assert result.macs_after <= 0.5 * result.macs_before
    with zipfile.ZipFile(job.archives["safetensors"]) as bundle:
        bundle.extractall(tmp_path / "safetensors")
    plan = Plan.from_json(json.loads((tmp_path / "safetensors/pruning-plan.json").read_text()))
    inputs = _example_inputs(result)
    rebuilt = apply_plan_(FAMILIES[name].build().eval(), inputs, plan)
    rebuilt.load_state_dict(load_file(tmp_path / "safetensors/model.safetensors"), strict=True)
    assert measure(rebuilt, inputs).macs == result.macs_after


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_validates_as_an_upload_with_inputs_of_its_own(tmp_path: Path, name: str) -> None:
    """Validation runs the model on example inputs before any data is seen: T5's and Whisper's
    need decoder inputs (and Whisper its mel frames), or the upload was rejected."""
    FAMILIES[name].build().save_pretrained(tmp_path / name)
    loaded = models.load(tmp_path / name, "hf", trusted=False)

    with torch.no_grad():
        run_forward(loaded.model, models.example_inputs(loaded))
