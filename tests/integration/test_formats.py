"""Every input and output format through the HTTP API of a running embedded service."""

import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime
import pytest
import torch
import transformers

from service.client import Client
from service.jobs.results import JobResult
from tests.integration.services import apoptosis, free_port, stop, wait_healthy
from tests.worker import factories
from tests.worker.family_zoo import FAMILIES


@pytest.fixture(scope="module")
def trusted_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    home = tmp_path_factory.mktemp("formats")
    port = free_port()
    log = home / "up.log"
    process = apoptosis(
        "up",
        "--port",
        str(port),
        "--home",
        str(home / "var"),
        env={"APOPTOSIS_TRUSTED_MODE": "true", "APOPTOSIS_API_KEY": ""},
        log=log,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log)
        deadline = time.monotonic() + 10
        while not (found := re.search(r"API key: (\S+)", log.read_text())):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        with Client(f"http://127.0.0.1:{port}", found.group(1)) as client:
            yield client
    finally:
        stop(process)


def _run(
    client: Client, model: Path, model_format: str, data: Path, data_format: str, **spec: Any
) -> tuple[JobResult, dict[str, Path]]:
    """The finished job's result and its downloaded artifacts by format."""
    uploaded = client.wait_for_model(client.upload_model(model, model_format).id)
    assert uploaded.state == "ready", uploaded.rejection_reason
    dataset = client.upload_dataset(data, data_format)
    job = client.submit_job(
        {
            "model_id": uploaded.id,
            "dataset_id": dataset.id,
            "schedule": {"steps": 2},
            "calibration": {"batches": 2, "batch_size": 16},
            **spec,
        }
    )
    finished = client.wait(job.id)
    assert finished.state == "succeeded", finished.error
    assert finished.result is not None
    artifacts = client.artifacts(job.id)
    assert sorted(a.format for a in artifacts) == sorted(spec["outputs"])
    out = model.parent / f"out-{job.id}"
    return finished.result, {a.format: client.download(a, out) for a in artifacts}


def test_jsonl_text_to_hf_safetensors_onnx_and_pt2(trusted_service: Client, tmp_path: Path) -> None:
    model = factories.zip_folder(factories.bert_folder(tmp_path), tmp_path / "bert.zip")
    data = factories.jsonl_file(tmp_path / "reviews.jsonl")

    result, files = _run(
        trusted_service,
        model,
        "hf",
        data,
        "jsonl",
        target={"macs": 0.5},
        outputs=["hf", "safetensors", "onnx", "pt2"],
    )

    with zipfile.ZipFile(files["hf"]) as bundle:
        bundle.extractall(tmp_path / "hf")
    pruned = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert pruned.config.intermediate_size < 256
    with zipfile.ZipFile(files["safetensors"]) as bundle:
        assert sorted(bundle.namelist()) == ["model.safetensors", "pruning-plan.json"]
    session = onnxruntime.InferenceSession(str(files["onnx"]))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    # pt2 and ONNX take the dataset's columns positionally and return the pruned model's
    # logits: three rows of the row shape the job traced (the batch axis is dynamic)
    length = result.example_inputs["input_ids"][1]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, len(factories.WORDS) + 4, (3, length), generator=generator)
    attention_mask = torch.ones(3, length, dtype=torch.long)
    attention_mask[1, length // 2 :] = 0  # a padded row
    with torch.no_grad():
        expected = pruned(input_ids=input_ids, attention_mask=attention_mask).logits
    program = torch.export.load(str(files["pt2"])).module()
    torch.testing.assert_close(program(input_ids, attention_mask), expected)
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    from_onnx = torch.from_numpy(session.run(None, feeds)[0])
    torch.testing.assert_close(from_onnx, expected, rtol=0, atol=1e-4)


def test_imagefolder_to_hf(trusted_service: Client, tmp_path: Path) -> None:
    model = factories.zip_folder(factories.vit_folder(tmp_path), tmp_path / "vit.zip")
    data = factories.imagefolder_zip(tmp_path / "images.zip")

    _, files = _run(
        trusted_service, model, "hf", data, "imagefolder", target={"macs": 0.5}, outputs=["hf"]
    )

    with zipfile.ZipFile(files["hf"]) as bundle:
        bundle.extractall(tmp_path / "hf")
    vit = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf")
    assert vit(pixel_values=torch.zeros(1, 3, 16, 16)).logits.shape == (1, 2)


def test_a_pickled_model_in_trusted_mode_to_a_pickle(
    trusted_service: Client, tmp_path: Path
) -> None:
    folder = factories.bert_folder(tmp_path)
    pickled = tmp_path / "bert.pt"
    torch.save(transformers.AutoModelForSequenceClassification.from_pretrained(folder), pickled)
    data = factories.tensors_file(tmp_path / "data.safetensors")

    result, files = _run(
        trusted_service,
        pickled,
        "torch_pickle",
        data,
        "tensors",
        granularity="unstructured",
        target={"sparsity": 0.5},
        outputs=["torch_pickle", "pt2"],
    )

    model = torch.load(files["torch_pickle"], weights_only=False).eval()
    weights = model.bert.encoder.layer[0].intermediate.dense.weight
    assert 0.3 < float((weights == 0).float().mean()) < 0.7
    # the pt2 program is that pruned model: the same logits, on a batch of three rows
    shape = result.example_inputs["input_ids"]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, len(factories.WORDS) + 4, (3, *shape[1:]), generator=generator)
    program = torch.export.load(str(files["pt2"])).module()
    with torch.no_grad():
        torch.testing.assert_close(program(input_ids), model(input_ids=input_ids).logits)


@pytest.mark.parametrize("name", ["phi3", "flan_t5", "qwen2_moe", "modernbert", "bloom"])
def test_families_through_the_api_to_an_hf_output_that_reloads(
    trusted_service: Client, tmp_path: Path, name: str
) -> None:
    """Families described since the first families (fused FFNs, an encoder-decoder with its
    decoder inputs in the dataset, a shared expert, an FFN the class fixes at 4 × hidden_size)
    as a user brings them: uploaded, pruned to half their MACs by the service, downloaded and
    loaded with their own class."""
    family = FAMILIES[name]
    torch.manual_seed(0)
    family.build().save_pretrained(tmp_path / name)
    model = factories.zip_folder(tmp_path / name, tmp_path / f"{name}.zip")
    data = family.data(tmp_path / "data.safetensors")

    result, files = _run(
        trusted_service,
        model,
        "hf",
        data,
        "tensors",
        outputs=["hf"],
        loss=family.loss,
        target={"macs": 0.5},
    )

    assert result.macs_after <= 0.5 * result.macs_before
    relative_diff = result.exports["hf"].relative_diff
    assert relative_diff is not None and relative_diff <= 1e-4
    with zipfile.ZipFile(files["hf"]) as bundle:
        bundle.extractall(tmp_path / "reloaded")
    config: Any = transformers.AutoConfig.from_pretrained(tmp_path / "reloaded")
    reloaded = getattr(transformers, config.architectures[0]).from_pretrained(tmp_path / "reloaded")
    assert sum(p.numel() for p in reloaded.parameters()) == result.params_after


def test_a_family_refused_with_hf_names_the_outputs_that_reach_it(
    trusted_service: Client, tmp_path: Path
) -> None:
    """Marian computes its sinusoidal positions from d_model when it loads: an hf output keeps
    its hidden size and cannot reach half, per-layer outputs can."""
    FAMILIES["marian"].build().save_pretrained(tmp_path / "marian")
    model = factories.zip_folder(tmp_path / "marian", tmp_path / "marian.zip")
    uploaded = trusted_service.wait_for_model(trusted_service.upload_model(model, "hf").id)
    dataset = trusted_service.upload_dataset(
        FAMILIES["marian"].data(tmp_path / "d.safetensors"), "tensors"
    )

    job = trusted_service.submit_job(
        {
            "model_id": uploaded.id,
            "dataset_id": dataset.id,
            "outputs": ["hf"],
            "loss": "distill",
            "target": {"macs": 0.5},
            "calibration": {"batches": 2, "batch_size": 16},
        }
    )
    finished = trusted_service.wait(job.id)

    assert finished.state == "failed" and finished.error is not None
    assert finished.error.code == "target_unreachable"
    assert "with an onnx, pt2 or safetensors output" in finished.error.message
    assert "sinusoidal positions are computed from d_model" in finished.error.message
    assert finished.error.per_layer is not None and finished.error.per_layer <= 0.5
