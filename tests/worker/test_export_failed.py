"""An exporter that cannot convert the pruned model fails the job with a code and the outputs
that remain, in one line: never an internal error (torch.onnx could not convert the zoo's
mixtures of experts nor T5)."""

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from worker.engine.plan import Plan
from worker.pipeline import export


class _DataDependent(nn.Module):
    """Control flow on a tensor's value: neither torch.export nor the onnx exporter trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return y if y.sum().item() > 0 else -y


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_an_exporter_that_cannot_convert_fails_with_a_code(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(export.ExportFailed) as failed:
        export.export(fmt, _DataDependent(), {"x": torch.randn(2, 4)}, None, tmp_path, Plan())

    message = str(failed.value)
    assert failed.value.code == "export_failed"
    assert message.startswith(f"the {fmt} exporter cannot convert _DataDependent (")
    assert message.endswith("instead") and "\n" not in message
    assert "safetensors" in message and f"ask for {fmt}" not in message


def test_the_exporter_s_colours_stay_out_of_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def coloured(*args: object) -> None:
        raise RuntimeError("\x1b[96mFailed to decompose the FX graph.\x1b[0m\nNext steps: …")

    monkeypatch.setattr(export, "export_onnx", coloured)
    with pytest.raises(export.ExportFailed) as failed:
        export.export("onnx", _DataDependent(), {"x": torch.randn(2, 4)}, None, tmp_path, Plan())

    assert "(RuntimeError: Failed to decompose the FX graph.);" in str(failed.value)
