"""The dtypes a job computes and exports in, and TF32 on CUDA.

A model comes back in the floating dtype it was saved in: a bfloat16 upload is exported in
bfloat16, half the bytes of float32. It is computed in:

- on CUDA, that dtype: bfloat16 and float16 run on tensor cores; scores are summed in float32
  either way (`worker.engine.scores`), and bench/precision.py reports how well half-precision
  scores rank channels against float32 ones. Float32 models use TF32 for matmuls and
  convolutions unless the operator turns it off (`APOPTOSIS_ALLOW_TF32=false`).
- on the CPU, float32: CPU half-precision kernels are slower than float32 ones, and the θ
  shortcut's LayerNorm backward is float32-only.

Fine-tuning a half-precision model keeps float32 master weights and runs its passes under
autocast to the saved dtype: plain AdamW steps on bfloat16 weights would round most updates away.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.parameter import is_lazy

HALF = (torch.bfloat16, torch.float16)


def saved_dtype(net: nn.Module) -> torch.dtype:
    """The floating dtype most of the model's parameter elements are stored in."""
    counts: dict[torch.dtype, int] = {}
    for parameter in net.parameters():
        if parameter.is_floating_point() and not is_lazy(parameter):  # lazy: no size yet
            counts[parameter.dtype] = counts.get(parameter.dtype, 0) + parameter.numel()
    return max(counts, key=lambda dtype: counts[dtype]) if counts else torch.float32


def compute_dtype(saved: torch.dtype, device: torch.device) -> torch.dtype:
    """What the job computes in on `device` for a model saved in `saved`."""
    if device.type == "cpu" and saved in HALF:
        return torch.float32
    return saved


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors (pixels, float inputs) in `dtype`; token ids and masks as they are."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def allow_tf32(allowed: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA (Ampere and later); a no-op
    elsewhere."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


@contextmanager
def master_weights(net: nn.Module, device: torch.device) -> Iterator[None]:
    """Within the block a half-precision model trains in float32 with autocast to its dtype;
    after it, the weights are back in that dtype. A float32 model is left as it is."""
    dtype = saved_dtype(net)
    if dtype not in HALF:
        yield
        return
    net.float()
    try:
        with torch.autocast(device.type, dtype=dtype):
            yield
    finally:
        net.to(dtype)
