"""Each architecture family: upload as hf → prune to half the MACs → reload → run; ONNX ≈ torch."""

import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from tests.worker import factories
from worker.engine import measure
from worker.pipeline import export
from worker.pipeline.steps import JobFailed, JobFiles, execute

DATA = {
    "text": factories.tensors_file,
    "lm": factories.lm_tensors_file,
    "image": factories.image_tensors_file,
}


@pytest.mark.slow  # over 5 s: whole jobs with every export
@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "llama", "resnet", "convnext"])
def test_half_the_macs_reloads_and_matches_onnx(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, kind = factories.architecture_folder(tmp_path, name)
    exported: list[nn.Module] = []  # the pruned module, as the exporters were given it
    write = export.export

    def kept(fmt: str, model: nn.Module, *args: Any) -> export.Exported:
        exported.append(model)
        return write(fmt, model, *args)

    monkeypatch.setattr(export, "export", kept)
    data = DATA[kind](tmp_path / "data.safetensors")
    outputs = ["hf", "onnx"]
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

    assert result.macs_after <= 0.5 * result.macs_before
    onnx = result.exports["onnx"]
    assert onnx.max_abs_diff is not None and onnx.max_abs_diff <= 1e-4
    assert onnx.dynamic_batch is True
    [hf] = [e.path for e in exports if e.format == "hf"]
    with zipfile.ZipFile(hf) as bundle:
        bundle.extractall(tmp_path / "reloaded")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "reloaded")
    architecture = getattr(transformers, config.architectures[0])
    model = architecture.from_pretrained(tmp_path / "reloaded").eval()
    shape = result.example_inputs
    inputs = {
        k: torch.zeros(v, dtype=torch.long if k == "input_ids" else torch.float)
        for k, v in shape.items()
    }
    assert measure(model, inputs).macs == result.macs_after
    # the reloaded model computes what the pruned one did, on three rows of varied inputs
    generator = torch.Generator().manual_seed(1)
    rows = {
        k: torch.randint(4, len(factories.WORDS) + 4, (3, *v[1:]), generator=generator)
        if k == "input_ids"
        else torch.randn(3, *v[1:], generator=generator)
        for k, v in shape.items()
    }
    pruned = exported[-1].eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**rows).logits, pruned(**rows).logits)


def test_hf_output_of_a_plain_module_fails_clearly_before_pruning(tmp_path: Path) -> None:
    pickled = tmp_path / "cnn.pt"
    torch.save(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)), pickled
    )
    data = factories.image_tensors_file(tmp_path / "data.safetensors")

    with pytest.raises(JobFailed, match="needs a Hugging Face model"):
        execute(
            factories.spec(outputs=["hf"]),
            JobFiles(pickled, "torch_pickle", data, "tensors", None, tmp_path),
            torch.device("cpu"),
            True,
            lambda progress: None,
        )
