"""`apoptosis prune`: every input and output format through the local CLI."""

import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from service.cli.main import app
from tests.worker import factories
from tests.worker.family_zoo import FAMILIES


def _prune(*args: str) -> str:
    result = CliRunner().invoke(
        app,
        ["prune", *args, "--steps", "2", "--batches", "2", "--batch-size", "16", "--device", "cpu"],
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert "MACs" in result.output  # the before/after table
    assert "Traceback" not in result.output
    assert "it/s]" not in result.output  # one progress bar: transformers' own are off
    return result.output


@pytest.mark.slow  # over 5 s: whole jobs with every export
@pytest.mark.parametrize("packed", [True, False])
def test_an_hf_model_to_every_output(tmp_path: Path, packed: bool) -> None:
    folder = factories.bert_folder(tmp_path)
    model = factories.zip_folder(folder, tmp_path / "bert.zip") if packed else folder
    data = factories.tensors_file(tmp_path / "data.safetensors")
    out = tmp_path / "out"

    _prune(
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        "--target",
        "macs=0.5",
        "--outputs",
        "hf,safetensors,onnx,pt2,torch_pickle",
        "--trusted",
    )

    assert sorted(p.name for p in out.iterdir()) == [
        "model-hf.zip",
        "model-safetensors.zip",
        "model.onnx",
        "model.pt",
        "model.pt2",
    ]
    with zipfile.ZipFile(out / "model-hf.zip") as bundle:
        bundle.extractall(tmp_path / "hf")
    pruned = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert pruned.config.intermediate_size < 256
    assert isinstance(torch.load(out / "model.pt", weights_only=False), torch.nn.Module)


def test_a_pickled_model_needs_trusted_mode(tmp_path: Path) -> None:
    folder = factories.bert_folder(tmp_path)
    pickled = tmp_path / "bert.pt"
    torch.save(transformers.AutoModelForSequenceClassification.from_pretrained(folder), pickled)
    data = factories.tensors_file(tmp_path / "data.safetensors")

    refused = CliRunner().invoke(
        app,
        [
            "prune",
            str(pickled),
            "--format",
            "torch_pickle",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "no"),
        ],
    )
    assert refused.exit_code == 2
    assert "unsafe_format" in refused.output and "trusted" in refused.output  # one line
    assert "Traceback" not in refused.output

    _prune(
        str(pickled),
        "--format",
        "torch_pickle",
        "--data",
        str(data),
        "--output",
        str(tmp_path / "out"),
        "--outputs",
        "safetensors,pt2",
        "--trusted",
        "--granularity",
        "unstructured",
        "--target",
        "sparsity=0.5",
    )
    assert (tmp_path / "out" / "model.pt2").is_file()


def test_a_family_shows_every_member_and_every_file_whole(tmp_path: Path) -> None:
    folder = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "data.safetensors")
    out = tmp_path / "a-long-folder-name-that-a-table-cell-would-cut" / "out"

    output = _prune(
        str(folder), "--data", str(data), "--output", str(out), "--targets", "macs=0.75,0.5"
    )

    assert "macs 0.75" in output and "macs 0.5" in output  # a column each
    assert "macs kept 0.7" in output and "targets 0.75, 0.5" in output  # what each reached
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(written) == 2
    for path in written:
        assert f"→ hf: {path}" in output


def test_a_latency_target_reports_what_was_measured(tmp_path: Path) -> None:
    folder = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "data.safetensors")

    # ten seconds: met before any pruning, whatever the machine is doing
    output = _prune(
        str(folder),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "out"),
        "--target",
        "latency_ms=10000,batch=2",
        "--outputs",
        "safetensors",
    )

    assert "at batch 2, target 10000 ms" in output
    assert "faster" in output


def test_a_user_error_is_one_unwrapped_line(tmp_path: Path) -> None:
    folder = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "data.safetensors")

    result = CliRunner().invoke(
        app,
        ["prune", str(folder), "--data", str(data), "--target", "macs=0.001", "--device", "cpu"],
    )

    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error ")]
    assert len(lines) == 1 and "target_unreachable" in lines[0]
    # the whole message, unwrapped, to its last clause (what the other outputs would reach)
    assert lines[0].rstrip().endswith("is reachable")


@pytest.mark.parametrize("name", ["phi3", "flan_t5"])
def test_a_family_folder_to_an_hf_output_that_reloads(tmp_path: Path, name: str) -> None:
    """A fused-FFN decoder and an encoder-decoder with decoder inputs in its data, as the
    service prunes them (tests/integration/test_formats.py), from the local CLI."""
    family = FAMILIES[name]
    torch.manual_seed(0)
    family.build().save_pretrained(tmp_path / name)
    data = family.data(tmp_path / "data.safetensors")

    _prune(
        str(tmp_path / name),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "out"),
        "--target",
        "macs=0.5",
        "--outputs",
        "hf",
        "--loss",
        family.loss,
    )

    with zipfile.ZipFile(tmp_path / "out" / "model-hf.zip") as bundle:
        bundle.extractall(tmp_path / "hf")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    original = family.build().config
    width = "d_ff" if name == "flan_t5" else "intermediate_size"
    assert getattr(config, width) < getattr(original, width)
    getattr(transformers, config.architectures[0]).from_pretrained(tmp_path / "hf")
