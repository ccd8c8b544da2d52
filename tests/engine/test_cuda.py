"""CUDA oracle tests (marker `gpu`; skipped where torch sees no CUDA device): the θ shortcut
against the CPU's float64 plain double-backward, half-precision scores against float32 ones,
and a whole job on the GPU in the dtype the model was saved in."""

from pathlib import Path

import pytest
import torch
import transformers

from tests.engine import models
from tests.worker import factories
from worker.engine import parameter_scores
from worker.engine.hvp import plain_theta_hvp, theta_hvp
from worker.pipeline.steps import JobFiles, execute

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def _residual_cnn(device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, list]:
    torch.manual_seed(0)
    model = models.ResidualCNN().to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(8, 2, 6, 6, generator=generator).to(device=device, dtype=dtype),
            torch.randint(0, 3, (8,), generator=generator).to(device),
        )
        for _ in range(2)
    ]
    return model, batches


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch[0]).float(), batch[1])


def test_theta_hvp_on_cuda_equals_the_cpu_plain_double_backward_in_float64() -> None:
    gpu_model, gpu_batches = _residual_cnn(CUDA, torch.float64)
    cpu_model, cpu_batches = _residual_cnn(torch.device("cpu"), torch.float64)
    gpu_params = [p for p in gpu_model.parameters() if p.requires_grad]
    cpu_params = [p for p in cpu_model.parameters() if p.requires_grad]

    fast = theta_hvp(lambda: _loss(gpu_model, gpu_batches[0]), gpu_params)
    with plain_theta_hvp():
        oracle = theta_hvp(lambda: _loss(cpu_model, cpu_batches[0]), cpu_params)

    for got, expected in zip(fast, oracle, strict=True):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_rank_channels_as_float32_scores_do(dtype: torch.dtype) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    reference_model, reference_batches = _residual_cnn(CUDA, torch.float32)
    half_model, half_batches = _residual_cnn(CUDA, dtype)
    reference = parameter_scores(reference_model, reference_batches, _loss, "oba")
    half = parameter_scores(half_model, half_batches, _loss, "oba")
    for name in ("conv1.weight", "conv2.weight", "expand.weight"):
        a = reference[name].flatten(1).sum(1).abs()
        b = half[name].flatten(1).sum(1).abs()
        ranks = [v.argsort().argsort().double() for v in (a, b)]
        centred = [r - r.mean() for r in ranks]
        rho = (centred[0] * centred[1]).sum() / (centred[0].norm() * centred[1].norm())
        assert rho >= 0.9, name


def test_a_bfloat16_job_runs_on_cuda_in_bfloat16_and_exports_bfloat16(tmp_path: Path) -> None:
    folder = factories.bert_folder(tmp_path)
    model = transformers.BertForSequenceClassification.from_pretrained(folder, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    data = factories.tensors_file(tmp_path / "data.safetensors")
    spec = factories.spec(outputs=["hf"], finetune={"epochs": 1, "lr": 1e-3})

    result, exports = execute(
        spec, JobFiles(folder, "hf", data, "tensors", None, tmp_path), CUDA, False, lambda _: None
    )

    assert result.macs_after <= spec.target.value * result.macs_before
    assert exports[0].path.exists()
