"""Dtypes: a half-precision upload is computed in float32 on the CPU and comes back in its own
dtype; fine-tuning keeps float32 master weights."""

import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from tests.worker import factories
from worker.engine import prune_
from worker.pipeline import precision, steps
from worker.pipeline.steps import JobFiles, execute

CPU = torch.device("cpu")


def test_half_precision_is_computed_in_float32_on_the_cpu_and_as_saved_on_cuda() -> None:
    cuda = torch.device("cuda")
    assert precision.compute_dtype(torch.bfloat16, CPU) == torch.float32
    assert precision.compute_dtype(torch.float16, CPU) == torch.float32
    assert precision.compute_dtype(torch.float64, CPU) == torch.float64
    assert precision.compute_dtype(torch.bfloat16, cuda) == torch.bfloat16
    assert precision.compute_dtype(torch.float32, cuda) == torch.float32


def test_the_saved_dtype_is_that_of_most_parameter_elements() -> None:
    model = nn.Sequential(nn.Linear(64, 64).to(torch.bfloat16), nn.LayerNorm(64))
    assert precision.saved_dtype(model) == torch.bfloat16
    assert precision.saved_dtype(nn.ReLU()) == torch.float32  # nothing to go by


def test_fine_tuning_a_half_precision_model_steps_float32_master_weights() -> None:
    model = nn.Linear(4, 2).to(torch.bfloat16)
    with precision.master_weights(model, CPU):
        assert model.weight.dtype == torch.float32
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled(
            "cpu"
        )
        # an update far below bfloat16's resolution at 1.0 survives in float32
        model.weight.data.fill_(1.0)
        model.weight.data.add_(1e-4)
        assert (model.weight != 1.0).all()
    assert model.weight.dtype == torch.bfloat16
    untouched = nn.Linear(4, 2)
    with precision.master_weights(untouched, CPU):
        assert not torch.is_autocast_enabled("cpu")
    assert untouched.weight.dtype == torch.float32


def _bfloat16_upload(root: Path) -> tuple[Path, Path]:
    """A BERT classifier saved in bfloat16, and tensors to prune it on."""
    folder = factories.bert_folder(root)
    model = transformers.BertForSequenceClassification.from_pretrained(folder, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder, factories.tensors_file(root / "data.safetensors")


def test_a_bfloat16_upload_is_pruned_in_float32_and_exported_in_bfloat16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, data = _bfloat16_upload(tmp_path)
    spec = factories.spec(outputs=["hf", "safetensors"], finetune={"epochs": 1, "lr": 1e-3})
    pruned_in: list[torch.dtype] = []

    def recording_prune(net: nn.Module, *args: Any, **kwargs: Any) -> Any:
        pruned_in.append(next(net.parameters()).dtype)
        return prune_(net, *args, **kwargs)

    monkeypatch.setattr(steps, "prune_", recording_prune)

    result, exports = execute(
        spec, JobFiles(folder, "hf", data, "tensors", None, tmp_path), CPU, False, lambda _: None
    )

    assert pruned_in == [torch.float32]
    assert result.macs_after <= spec.target.value * result.macs_before
    assert result.after_finetune is not None
    paths = {e.format: e.path for e in exports}
    with zipfile.ZipFile(paths["hf"]) as archive:
        archive.extractall(tmp_path / "hf")
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.config.intermediate_size < 256  # the pruned model, in its own dtype
    with zipfile.ZipFile(paths["safetensors"]) as archive:
        archive.extractall(tmp_path / "st")
    weights = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}


def test_tf32_follows_the_setting() -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        precision.allow_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        precision.allow_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_family_goes_on_from_unrounded_weights_after_exporting_a_member_in_bfloat16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, data = _bfloat16_upload(tmp_path)
    spec = factories.spec(
        targets=[{"macs": 0.7}, {"macs": 0.5}], finetune={"epochs": 1, "lr": 1e-2}
    )
    beyond_bfloat16: list[bool] = []

    def recording_prune(net: nn.Module, *args: Any, **kwargs: Any) -> Any:
        weights = [p for p in net.parameters() if p.dim() == 2]
        beyond_bfloat16.append(any(not torch.equal(w, w.bfloat16().float()) for w in weights))
        return prune_(net, *args, **kwargs)

    monkeypatch.setattr(steps, "prune_", recording_prune)
    result, exports = execute(
        spec, JobFiles(folder, "hf", data, "tensors", None, tmp_path), CPU, False, lambda _: None
    )

    assert len(result.family or []) == 2 and len(exports) == 2
    # the first target starts from the bfloat16 upload; the second from float32 fine-tuning
    assert beyond_bfloat16 == [False, True]
