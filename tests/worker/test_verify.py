"""An `hf` output is loaded back before the job succeeds: a config the class rebuilds
differently, or a folder that loads but computes another function, fails the job with
`export_mismatch` naming what differs; a good one records how closely it matched."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select
from torch import nn

from service.core.db import get_sessionmaker
from service.core.orm import Artifact, Job
from service.jobs.results import JobResult
from tests.worker import factories
from tests.worker.stored import stored_bert, stored_job
from worker.engine import architectures
from worker.pipeline.verify import TOLERANCE, ExportMismatch, compare
from worker.runtime import lifecycle

CPU = torch.device("cpu")


def _execute(tmp_path: Path, **spec: Any) -> JobResult:
    return factories.run_bert_job(tmp_path, factories.spec(**spec))


@pytest.fixture
def wrong_ffn_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The config update states an FFN width the pruned weights do not have."""

    def off_by_one(model: nn.Module) -> Iterator[int]:
        for module in model.modules():
            if type(module).__name__ == "BertIntermediate":
                dense = module.get_submodule("dense")
                assert isinstance(dense, nn.Linear)
                yield dense.out_features + 1

    monkeypatch.setattr(architectures, "_ffn_widths", off_by_one)


def test_an_hf_output_records_how_it_reloaded(tmp_path: Path) -> None:
    result = _execute(tmp_path)

    checks = result.exports["hf"]
    assert checks.loaded_with == "BertForSequenceClassification"
    assert checks.relative_diff is not None and checks.max_abs_diff is not None
    assert 0 <= checks.relative_diff <= TOLERANCE and checks.max_abs_diff >= 0


def test_a_wrong_config_update_fails_the_job_naming_the_tensors(
    tmp_path: Path, wrong_ffn_width: None
) -> None:
    with pytest.raises(ExportMismatch) as mismatch:
        _execute(tmp_path)

    assert mismatch.value.code == "export_mismatch"
    assert "BertForSequenceClassification.from_pretrained" in str(mismatch.value)
    assert "intermediate" in str(mismatch.value)
    assert list((tmp_path / "work").rglob("*.zip")) == []  # nothing is published


def test_a_folder_that_loads_but_computes_another_function_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved config changes an epsilon no tensor shows: the shapes all match, the outputs
    do not."""
    original = architectures.sync_structure

    def and_a_wrong_epsilon(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        written = original(model, *args, **kwargs)
        model.config.layer_norm_eps = 0.5
        return written

    monkeypatch.setattr(architectures, "sync_structure", and_a_wrong_epsilon)

    with pytest.raises(ExportMismatch, match="computes another function"):
        _execute(tmp_path)


def test_a_job_whose_output_does_not_reload_ends_failed_never_succeeded(
    tenant: str, tmp_path: Path, wrong_ffn_width: None
) -> None:
    model_id = stored_bert(tenant, tmp_path)
    lifecycle.validate_model(model_id)
    spec = factories.spec(outputs=["hf"]).model_dump(mode="json")
    job_id = stored_job(tenant, model_id, tmp_path, spec)

    lifecycle.run_job(job_id)

    with get_sessionmaker()() as session:
        job = session.get_one(Job, job_id)
        artifacts = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
    assert job.state == "failed" and job.result is None and not artifacts
    assert job.error is not None and job.error["code"] == "export_mismatch"
    assert "shapes differ" in job.error["message"] or "size" in job.error["message"]


@pytest.mark.parametrize(
    ("actual", "says"),
    [
        (torch.ones(2, 4), "shape"),
        (torch.full((2, 3), float("nan")), "another function"),
        (torch.ones(2, 3) * 1.01, "another function"),
    ],
)
def test_a_runtime_output_that_differs_is_a_mismatch(actual: torch.Tensor, says: str) -> None:
    with pytest.raises(ExportMismatch, match=says):
        compare(torch.ones(2, 3), actual, "the onnx output", 1e-3)


def test_a_runtime_output_within_rounding_records_its_difference() -> None:
    checks = compare(torch.ones(2, 3) * 4, torch.ones(2, 3) * 4.0004, "the pt2 output", 1e-3)

    assert checks["max_abs_diff"] == pytest.approx(4e-4, rel=1e-3)
    assert checks["relative_diff"] == pytest.approx(1e-4, rel=1e-3)
