"""Each family of `tests/worker/family_zoo.py`, uploaded as an `hf` folder and pruned by the job
with an `hf` output to half its MACs: either it gets there, the job's own reload check passes and
the output reloads with the family's class at the pruned size, or the job is refused before
anything is pruned, in one line that says what it can reach."""

import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests.worker import factories
from tests.worker.family_zoo import FAMILIES, Family
from worker.engine import TargetUnreachable, measure
from worker.engine.families import FAMILIES as DESCRIBED
from worker.steps import JobFailed, JobFiles, execute

PRUNED = sorted(n for n, f in FAMILIES.items() if f.reaches <= 0.5)
REFUSED = sorted(n for n, f in FAMILIES.items() if f.reaches > 0.5)


def _execute(tmp_path: Path, family: Family, target: float) -> tuple[dict[str, Any], Path]:
    """The job on `family` uploaded as an hf folder: its result and its hf archive."""
    torch.manual_seed(0)
    folder = tmp_path / "upload"
    family.build().save_pretrained(folder)
    spec = factories.spec(
        outputs=["hf"],
        loss=family.loss,
        method=family.method,
        target={"macs": target},
        calibration={"batches": 2, "batch_size": 4},
    )
    data = family.data(tmp_path / "data.safetensors")
    (tmp_path / "work").mkdir()
    result, exports = execute(
        spec,
        JobFiles(folder, "hf", data, "tensors", None, tmp_path / "work"),
        torch.device("cpu"),
        False,
        lambda progress: None,
    )
    [hf] = [e.path for e in exports if e.format == "hf"]
    return result, hf


def _model_type(name: str) -> str:
    return str(FAMILIES[name].build().config.model_type)


def test_every_described_family_is_in_the_zoo() -> None:
    assert set(DESCRIBED) - {"mt5", "umt5"} <= {_model_type(n) for n in FAMILIES}


def _marked(names: list[str]) -> list[Any]:
    return [pytest.param(n, marks=[pytest.mark.slow] * FAMILIES[n].slow) for n in names]


@pytest.mark.parametrize("name", _marked(PRUNED))
def test_prunes_to_half_with_an_hf_output_that_reloads(tmp_path: Path, name: str) -> None:
    result, hf = _execute(tmp_path, FAMILIES[name], 0.5)

    assert result["macs_after"] <= 0.5 * result["macs_before"]
    assert result["exports"]["hf"]["relative_diff"] <= 1e-4  # the job's own reload check
    with zipfile.ZipFile(hf) as bundle:
        bundle.extractall(tmp_path / "reloaded")
    config: Any = transformers.AutoConfig.from_pretrained(tmp_path / "reloaded")
    model = getattr(transformers, config.architectures[0]).from_pretrained(tmp_path / "reloaded")
    inputs = {
        k: torch.zeros(
            shape, dtype=torch.float if k in ("pixel_values", "input_features") else torch.long
        )
        for k, shape in result["example_inputs"].items()
    }
    reloaded = measure(model.eval(), inputs)
    assert (reloaded.macs, reloaded.params) == (result["macs_after"], result["params_after"])


@pytest.mark.parametrize("name", _marked(REFUSED))
def test_is_refused_at_half_before_pruning_saying_what_it_can_reach(
    tmp_path: Path, name: str
) -> None:
    family = FAMILIES[name]
    with pytest.raises((TargetUnreachable, JobFailed)) as refused:
        _execute(tmp_path, family, 0.5)

    assert "\n" not in str(refused.value)
    if isinstance(refused.value, TargetUnreachable):
        assert 0.5 < refused.value.reachable <= family.reaches
    else:  # the config states no width this family's pruning could move
        assert family.reaches == 1.0
        assert "choose safetensors, onnx or pt2" in str(refused.value)


@pytest.mark.slow
def test_bart_prunes_to_what_it_can_reach_with_an_hf_output(tmp_path: Path) -> None:
    result, _ = _execute(tmp_path, FAMILIES["bart"], FAMILIES["bart"].reaches)

    assert result["macs_after"] <= FAMILIES["bart"].reaches * result["macs_before"]
    assert result["exports"]["hf"]["relative_diff"] <= 1e-4
