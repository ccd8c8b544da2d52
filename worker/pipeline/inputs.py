"""A job's inputs made ready for its stages: the model on its device in the dtype it computes
in, the calibration and evaluation batches, the loss, and the example batch that MACs, latency
and the exporters use. Everything a user can fix fails here, before any pruning."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.core.errors import CodedError
from service.jobs.results import Progress
from service.jobs.schemas import JobSpec
from worker.engine import architectures
from worker.pipeline import datasets, losses, memory, microbatch, models, precision

Batch = dict[str, Any]


class JobFailed(CodedError):
    """A job that cannot go on for a reason its user can fix (`target_unreachable`, …)."""


@dataclass(frozen=True)
class JobFiles:
    model_root: Path  # the extracted model upload (or the pickle file)
    model_format: str
    data: Path
    data_format: str
    evaluation: Path | None  # a separate evaluation dataset, same format as `data`
    work: Path  # where exports are written


@dataclass
class Inputs:
    loaded: models.LoadedModel
    net: torch.nn.Module  # the loaded model, on the device, in the working dtype
    saved: torch.dtype  # what the outputs are written in
    working: torch.dtype  # what the model computes in on the device
    calibration: list[Batch]  # in micro-batches of at most `pass_rows` rows
    evaluation: list[Batch]  # the held-out batches, or the calibration batches
    held_out: bool
    loss_fn: losses.LossFn
    example: Batch  # one calibration micro-batch: what MACs and latency refer to
    micro_batch_rows: int  # fewer than batch_size when a batch would not fit in memory
    # distillation from the uploaded model as loaded (`JobSpec.distils_from_the_original`)
    distill_fn: losses.LossFn | None = None

    def finetune_loss(self, spec: JobSpec) -> losses.LossFn:
        """What the job's fine-tune minimises: KL from the uploaded model where it distils
        (`JobSpec.finetune_distils`), else the job's loss."""
        if spec.finetune_distils:
            assert self.distill_fn is not None  # load_inputs keeps it for such a spec
            return self.distill_fn
        return self.loss_fn

    def cpu_example(self) -> Batch:
        """The example as the exporters trace it: on the CPU, in the dtype the model is saved."""
        return {
            k: precision.cast(v.cpu(), self.saved) if isinstance(v, torch.Tensor) else v
            for k, v in self.example.items()
        }


def load_inputs(
    spec: JobSpec,
    files: JobFiles,
    device: torch.device,
    trusted: bool,
    memory_limit: int,
    report: Callable[[Progress], None],
) -> Inputs:
    """The model and data of `spec`, checked; `memory_limit` caps the bytes the job may use
    (0: what the device has free)."""
    report(Progress(stage="loading", percent=0))
    loaded = models.load(files.model_root, files.model_format, trusted=trusted)
    searching = spec.search.candidates > 1
    distilling = spec.loss == "distill" or spec.distils_from_the_original
    memory.check_fits(loaded.model, device, memory_limit, searching, distilling)
    saved = precision.saved_dtype(loaded.model)
    working = precision.compute_dtype(saved, device)
    net = loaded.model.to(device=device, dtype=working)
    if "hf" in spec.outputs:
        _check_hf_output(net, spec.granularity)
    columns, held_out = _columns(spec, files, loaded)
    size = spec.calibration.batch_size
    calibration = datasets.batches(columns, spec.calibration.batches, size, device, working)
    if not calibration:
        raise JobFailed("empty_dataset", "the dataset has no rows")
    if spec.loss in losses.NEED_LABELS and "labels" not in columns:
        raise JobFailed(
            "missing_labels",
            f"loss {spec.loss!r} needs a 'labels' array in the dataset; add one, or use "
            "loss 'distill', which needs none",
        )
    evaluation = calibration
    if held_out is not None:
        evaluation = datasets.batches(held_out, 10_000, size, device, working)
    report(Progress(stage="measuring", percent=0))
    loss_fn = losses.make_loss(spec.loss, net, loaded.pooling)
    # the uploaded model, frozen before any pruning, for what distils from it
    teacher = losses.distillation(net, loaded.pooling) if spec.distils_from_the_original else None
    room = memory.free_bytes(device, memory_limit)
    if spec.calibration.max_memory is not None:
        room = min(room, spec.calibration.max_memory)
    pass_rows = microbatch.rows_per_pass(net, loss_fn, calibration[0], room)
    calibration = microbatch.split(calibration, pass_rows)
    example = models.example_inputs(loaded, batch=calibration[0], device=device)
    return Inputs(
        loaded,
        net,
        saved,
        working,
        calibration,
        evaluation,
        held_out is not None,
        loss_fn,
        example,
        min(pass_rows, size),
        teacher,
    )


def _columns(
    spec: JobSpec, files: JobFiles, loaded: models.LoadedModel
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The dataset's columns, and the held-out ones: a separate dataset, or a fraction split
    off (None: the job evaluates on its calibration batches)."""
    preprocess = spec.preprocess.model_dump() if spec.preprocess else None
    columns = datasets.load(files.data, files.data_format, loaded, preprocess)
    if files.evaluation is not None:
        return columns, datasets.load(files.evaluation, files.data_format, loaded, preprocess)
    if spec.evaluation is not None and spec.evaluation.fraction:
        return datasets.split(columns, spec.evaluation.fraction)
    return columns, None


def _check_hf_output(net: torch.nn.Module, granularity: str) -> None:
    """Fail before pruning when a Hugging Face config could not describe the result."""
    if not hasattr(net, "save_pretrained"):
        raise JobFailed(
            "invalid_output",
            "the hf output needs a Hugging Face model; choose safetensors, onnx or pt2",
        )
    describable = (
        architectures.is_transformer(net)
        or architectures.describes_stage_widths(net)
        or architectures.states_width_multiplier(net)
    )
    if granularity == "channel" and not describable:
        raise JobFailed(
            "invalid_output",
            f"the config of {type(net).__name__} cannot describe "
            "pruned channels; choose safetensors, onnx or pt2 (or unstructured)",
        )
