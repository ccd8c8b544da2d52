"""The `safetensors` output is rebuilt inside the job as its users rebuild it: the upload's
architecture from its config, the written plan replayed on it (`apply_plan_`), the written
weights loaded strictly, the same outputs on the example batch. A plan that does not replay, a
tensor missing or left over, or other outputs fail the job with `export_mismatch`, naming what
differs; an upload without a config (a pickled module) says the replay was not verified."""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from service.jobs.results import ExportChecks, JobResult
from tests.worker import factories
from tests.worker.family_zoo import FAMILIES
from worker.engine.plan import Plan
from worker.pipeline import export
from worker.pipeline.steps import JobFiles, execute
from worker.pipeline.verify import REPLAYED_WITH, TOLERANCE, ExportMismatch

CPU = torch.device("cpu")


def _job(tmp_path: Path, upload: Path, data: Path, *, fmt: str = "hf", **spec: Any) -> JobResult:
    work = tmp_path / "work"
    work.mkdir()
    files = JobFiles(upload, fmt, data, "tensors", None, work)
    job = factories.spec(**{"outputs": ["safetensors"]} | spec)
    result, _ = execute(job, files, CPU, fmt == "torch_pickle", lambda _: None)
    return result


def _bart(tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    """BART's d_model moves at half its MACs, so its plan removes the channels of `shared`, an
    embedding outside the traced graph (`Plan.embedding_removals`)."""
    family = FAMILIES["bart"]
    torch.manual_seed(0)
    family.build().save_pretrained(tmp_path / "upload")
    spec = {"loss": family.loss, "method": family.method, "target": {"macs": 0.5}}
    spec["outputs"] = ["hf", "safetensors"]  # one width per kind: d_model moves with the heads
    calibration = {"batches": 2, "batch_size": 4}
    return (
        tmp_path / "upload",
        family.data(tmp_path / "data.safetensors"),
        spec | {"calibration": calibration},
    )


Change = Callable[[Plan], Plan]


@pytest.fixture
def wrong_plan(monkeypatch: pytest.MonkeyPatch) -> list[Change]:
    """The export is handed the job's plan as the change appended to the list makes it."""
    changes: list[Change] = []
    original = export.export

    def with_a_wrong_plan(
        fmt: str,
        model: nn.Module,
        inputs: dict[str, Any],
        source: Path | None,
        out: Path,
        plan: Plan,
    ) -> export.Exported:
        [change] = changes
        return original(fmt, model, inputs, source, out, change(plan))

    monkeypatch.setattr(export, "export", with_a_wrong_plan)
    return changes


def _without_embedding_removals(plan: Plan) -> Plan:
    assert plan.embedding_removals, "the job's plan removes no embedding's channels"
    return dataclasses.replace(plan, embedding_removals=[])


def _without_the_last_step(plan: Plan) -> Plan:
    return dataclasses.replace(plan, history=plan.history[:-1])


def test_a_safetensors_output_records_how_its_plan_replayed(tmp_path: Path) -> None:
    upload = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "data.safetensors")

    result = _job(tmp_path, upload, data)

    checks = result.exports["safetensors"]
    assert checks.loaded_with == REPLAYED_WITH and checks.not_verified is None
    assert checks.relative_diff is not None and checks.max_abs_diff is not None
    assert 0 <= checks.relative_diff <= TOLERANCE and checks.max_abs_diff >= 0


def test_a_tied_lm_head_replays_with_a_strict_load(tmp_path: Path) -> None:
    """GPT-2's head is its input embedding: the file holds a copy under each name, and both
    load strictly into the one parameter of the rebuilt model."""
    upload, _ = factories.architecture_folder(tmp_path, "gpt2")
    assert transformers.AutoConfig.from_pretrained(upload).tie_word_embeddings
    data = factories.lm_tensors_file(tmp_path / "data.safetensors")

    result = _job(tmp_path, upload, data, loss="causal_lm")

    checks = result.exports["safetensors"]
    assert checks.loaded_with == REPLAYED_WITH
    assert checks.relative_diff is not None and checks.relative_diff <= TOLERANCE


def test_an_encoder_decoder_whose_d_model_moved_replays(tmp_path: Path) -> None:
    upload, data, spec = _bart(tmp_path)

    checks = _job(tmp_path, upload, data, **spec).exports["safetensors"]

    assert checks.loaded_with == REPLAYED_WITH
    assert checks.relative_diff is not None and checks.relative_diff <= TOLERANCE


def test_a_plan_without_an_embedding_removal_fails_the_job_naming_the_tensor(
    tmp_path: Path, wrong_plan: list[Change]
) -> None:
    """What commit 308ab48 fixed: the job succeeded with a plan that left BART's `shared` at
    the original d_model, and a user's strict load failed on it."""
    upload, data, spec = _bart(tmp_path)
    wrong_plan.append(_without_embedding_removals)

    with pytest.raises(ExportMismatch) as mismatch:
        _job(tmp_path, upload, data, **spec)

    message = str(mismatch.value)
    assert mismatch.value.code == "export_mismatch" and "\n" not in message
    assert "safetensors output does not rebuild the pruned model" in message
    assert "shapes differ" in message and "shared" in message
    assert list((tmp_path / "work").rglob("model-safetensors.zip")) == []


def test_a_plan_without_its_last_step_fails_the_job_naming_the_shapes(
    tmp_path: Path, wrong_plan: list[Change]
) -> None:
    upload = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "data.safetensors")
    wrong_plan.append(_without_the_last_step)

    with pytest.raises(ExportMismatch, match=r"shapes differ: bert\.encoder\.layer\.1\.attention"):
        _job(tmp_path, upload, data)


def test_weights_that_compute_another_function_fail_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every shape right, one tensor written wrong: only the outputs tell."""
    untie = export._untie

    def and_a_wrong_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        written = untie(state)
        return written | {"classifier.bias": written["classifier.bias"] + 1}

    monkeypatch.setattr(export, "_untie", and_a_wrong_bias)
    upload = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "data.safetensors")

    with pytest.raises(ExportMismatch, match="computes another function") as mismatch:
        _job(tmp_path, upload, data)

    assert f"the safetensors output rebuilt with {REPLAYED_WITH}" in str(mismatch.value)


def _in_a_module_the_original_lacks(plan: Plan) -> Plan:
    return dataclasses.replace(plan, history=[("bert.nowhere", o, i) for _, o, i in plan.history])


def test_a_plan_naming_a_module_the_original_lacks_does_not_replay(
    tmp_path: Path, wrong_plan: list[Change]
) -> None:
    wrong_plan.append(_in_a_module_the_original_lacks)
    upload = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "data.safetensors")

    with pytest.raises(ExportMismatch, match="plan does not replay on BertForSequenceClassif"):
        _job(tmp_path, upload, data)


def test_a_pickled_upload_says_its_replay_was_not_verified(tmp_path: Path) -> None:
    pickled = tmp_path / "bert.pt"
    folder = factories.bert_folder(tmp_path)
    torch.save(transformers.BertForSequenceClassification.from_pretrained(folder), pickled)
    data = factories.tensors_file(tmp_path / "data.safetensors")

    checks = _job(tmp_path, pickled, data, fmt="torch_pickle").exports["safetensors"]

    assert checks.loaded_with is None and checks.relative_diff is None
    assert checks.not_verified is not None and "replay" in checks.not_verified
    assert set(checks.model_dump(mode="json")) == {"not_verified"}


def test_checks_without_the_new_field_read_and_write_as_before() -> None:
    old = {"max_abs_diff": 0.0, "relative_diff": 0.0, "loaded_with": "BertModel"}

    assert ExportChecks.model_validate(old).model_dump(mode="json") == old
