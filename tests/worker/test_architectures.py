"""Each architecture family: upload as hf → prune to half the MACs → reload → run; ONNX ≈ torch."""

import zipfile
from pathlib import Path

import pytest
import torch
import transformers

from tests.worker import factories
from worker.job import JobFailed, JobFiles, execute

DATA = {
    "text": factories.tensors_file,
    "lm": factories.lm_tensors_file,
    "image": factories.image_tensors_file,
}


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "llama", "resnet", "convnext"])
def test_half_the_macs_reloads_and_matches_onnx(tmp_path: Path, name: str) -> None:
    folder, kind = factories.architecture_folder(tmp_path, name)
    data = DATA[kind](tmp_path / "data.safetensors")
    describable = name not in ("resnet", "convnext")  # their configs cannot state pruned widths
    outputs = ["hf", "onnx"] if describable else ["onnx", "pt2", "safetensors"]
    spec = factories.spec(
        outputs=outputs,
        loss="causal_lm" if kind == "lm" else "cross_entropy",
        calibration={"batches": 2, "batch_size": 8},
    )
    (tmp_path / "work").mkdir()

    result, exports = execute(
        spec,
        JobFiles(folder, "hf", data, "tensors", None, tmp_path / "work"),
        torch.device("cpu"),
        False,
        lambda progress: None,
    )

    assert result["macs_after"] <= 0.5 * result["macs_before"]
    assert result["exports"]["onnx"]["max_abs_diff"] <= 1e-4
    if describable:
        [hf] = [e.path for e in exports if e.format == "hf"]
        with zipfile.ZipFile(hf) as bundle:
            bundle.extractall(tmp_path / "reloaded")
        model = transformers.AutoModel.from_pretrained(tmp_path / "reloaded")
        shape = result["example_inputs"]
        inputs = {
            k: torch.zeros(v, dtype=torch.long if k == "input_ids" else torch.float)
            for k, v in shape.items()
        }
        with torch.no_grad():
            model(**inputs)


def test_hf_output_of_a_pruned_cnn_fails_clearly_before_pruning(tmp_path: Path) -> None:
    folder, _ = factories.architecture_folder(tmp_path, "resnet")
    data = factories.image_tensors_file(tmp_path / "data.safetensors")

    with pytest.raises(JobFailed, match="cannot describe pruned channels"):
        execute(
            factories.spec(outputs=["hf"]),
            JobFiles(folder, "hf", data, "tensors", None, tmp_path),
            torch.device("cpu"),
            False,
            lambda progress: None,
        )
