"""A dataset whose columns the model cannot take fails the job as `invalid_dataset`, before
anything runs, naming what the dataset has and what the model needs; not mid-job as an
`internal_error` carrying transformers' (or Python's) message."""

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from service.core.db import get_sessionmaker
from service.core.orm import Dataset, Job, Model
from service.core.store import store_file
from tests.worker import factories, family_zoo
from worker.pipeline import datasets, models
from worker.pipeline.steps import JobFiles, execute
from worker.runtime import lifecycle

CPU = torch.device("cpu")
ROWS = 8


def _tensors(path: Path, **columns: torch.Tensor) -> Path:
    save_file(columns | {"labels": torch.randint(0, 2, (ROWS,))}, str(path))
    return path


def _token_ids() -> torch.Tensor:
    return torch.randint(4, len(factories.WORDS) + 4, (ROWS, 12))


def _refusal(
    spec: Any, model: Path, model_format: str, data: Path, *, evaluation: Path | None = None
) -> tuple[datasets.DatasetRejected, list[str]]:
    """What `execute` raises on these files, and the stages it reported before."""
    stages: list[str] = []
    with pytest.raises(datasets.DatasetRejected) as raised:
        execute(
            spec,
            JobFiles(model, model_format, data, "tensors", evaluation, data.parent),
            CPU,
            True,  # trusted: the plain module below is a pickle
            lambda progress: stages.append(str(progress.stage)),
        )
    return raised.value, stages


@pytest.mark.parametrize("held_out", [False, True], ids=["calibration", "evaluation"])
def test_a_bert_dataset_without_input_ids_names_its_columns_and_the_models_input(
    tmp_path: Path, held_out: bool
) -> None:
    model = factories.bert_folder(tmp_path)
    wrong = _tensors(tmp_path / "wrong.safetensors", token_ids=_token_ids())
    good = _tensors(tmp_path / "good.safetensors", input_ids=_token_ids())

    error, stages = _refusal(
        factories.spec(),
        model,
        "hf",
        good if held_out else wrong,
        evaluation=wrong if held_out else None,
    )

    assert error.code == "invalid_dataset"
    message = str(error)
    assert "\n" not in message
    assert "labels, token_ids" in message  # what the dataset has
    assert "needs input_ids" in message  # what the model needs
    assert stages == ["loading"]


def test_an_image_dataset_for_a_text_model_names_the_input_it_lacks(tmp_path: Path) -> None:
    model = factories.bert_folder(tmp_path)
    images = factories.image_tensors_file(tmp_path / "images.safetensors")

    error, stages = _refusal(factories.spec(), model, "hf", images)

    assert error.code == "invalid_dataset"
    assert "labels, pixel_values" in str(error) and "needs input_ids" in str(error)
    assert stages == ["loading"]


@pytest.mark.parametrize("family", ["t5", "marian"])
def test_an_encoder_decoder_that_cannot_shift_its_inputs_asks_for_decoder_input_ids(
    tmp_path: Path, family: str
) -> None:
    """T5 and Marian build no decoder inputs from `input_ids` (BART does): without the column
    their forward would fail mid-job."""
    family_zoo.FAMILIES[family].build().save_pretrained(tmp_path / family)
    data = _tensors(tmp_path / "data.safetensors", input_ids=_token_ids())

    error, stages = _refusal(factories.spec(loss="distill"), tmp_path / family, "hf", data)

    assert error.code == "invalid_dataset"
    assert "needs input_ids, decoder_input_ids" in str(error)
    assert stages == ["loading"]


def test_bart_builds_its_decoder_inputs_from_input_ids(tmp_path: Path) -> None:
    family_zoo.FAMILIES["bart"].build().save_pretrained(tmp_path / "bart")
    loaded = models.load(tmp_path / "bart", "hf", trusted=False)

    datasets.check_columns({"input_ids": _token_ids()}, loaded)  # no refusal


def test_a_column_the_forward_has_no_argument_for_is_named(tmp_path: Path) -> None:
    pickled = tmp_path / "mlp.pt"
    torch.save(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2)), pickled)
    data = _tensors(
        tmp_path / "data.safetensors", input=torch.randn(ROWS, 12), mask=torch.ones(ROWS, 12)
    )

    error, stages = _refusal(factories.spec(outputs=["safetensors"]), pickled, "torch_pickle", data)

    assert error.code == "invalid_dataset"
    assert "input, labels, mask" in str(error)  # what the dataset has
    assert "no argument mask" in str(error) and "needs input" in str(error)
    assert stages == ["loading"]


def test_the_job_fails_as_invalid_dataset_not_as_an_internal_error(
    tenant: str, tmp_path: Path
) -> None:
    bert = factories.zip_folder(factories.bert_folder(tmp_path), tmp_path / "bert.zip")
    data = _tensors(tmp_path / "wrong.safetensors", token_ids=_token_ids())
    with get_sessionmaker()() as session:
        rows: list[Model | Dataset] = []
        for kind, path, upload_format in ((Model, bert, "hf"), (Dataset, data, "tensors")):
            blob = store_file(path)
            row = kind(
                tenant_id=tenant,
                name=path.name,
                format=upload_format,
                blob_key=blob.key,
                sha256=blob.sha256,
                size=blob.size,
            )
            session.add(row)
            rows.append(row)
        session.flush()
        model, dataset = rows
        spec = factories.spec().model_dump(mode="json")
        job = Job(tenant_id=tenant, model_id=model.id, dataset_id=dataset.id, spec=spec)
        session.add(job)
        session.commit()
        job_id = job.id

    lifecycle.run_job(job_id)

    with get_sessionmaker()() as session:
        failed = session.get(Job, job_id)
        assert failed is not None and failed.state == "failed"
        assert failed.error is not None and failed.error["code"] == "invalid_dataset"
        assert "token_ids" in failed.error["message"]
        assert "input_ids" in failed.error["message"]
