"""A job's steps, free of the database and the queue (tests call them directly):
load → measure → prune (with progress) → measure → fine-tune → measure → export."""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from service.errors import CodedError
from service.jobs.schemas import JobSpec
from worker import datasets, evaluation, export, finetune, losses, memory, models, tracking
from worker.engine import PruneConfig, StepRecord, architectures, prune_
from worker.engine.config import TargetMetric


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


Report = Callable[[dict[str, Any]], None]


def execute(
    spec: JobSpec,
    files: JobFiles,
    device: torch.device,
    trusted: bool,
    report: Report,
    check: Callable[[], None] = lambda: None,
    memory_limit: int = 0,
) -> tuple[dict[str, Any], list[export.Exported]]:
    """Run the job. `report` receives progress at every stage and may raise to stop it
    (cancellation); `check` is the cheap form, called between fine-tuning batches, and raises
    the same way (the lifecycle's reads the state its background heartbeat keeps).
    `memory_limit` caps the bytes the job may use (0: what the device has free)."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    report({"stage": "loading", "percent": 0})
    loaded = models.load(files.model_root, files.model_format, trusted=trusted)
    memory.check_fits(loaded.model, device, memory_limit)
    net = loaded.model.to(device)
    if "hf" in spec.outputs:
        _check_hf_output(net, spec.granularity)
    preprocess = spec.preprocess.model_dump() if spec.preprocess else None
    columns = datasets.load(files.data, files.data_format, loaded, preprocess)
    held_out = None
    if files.evaluation is not None:
        held_out = datasets.load(files.evaluation, files.data_format, loaded, preprocess)
    elif spec.evaluation is not None and spec.evaluation.fraction:
        columns, held_out = datasets.split(columns, spec.evaluation.fraction)
    size = spec.calibration.batch_size
    calibration = datasets.batches(columns, spec.calibration.batches, size, device)
    if not calibration:
        raise JobFailed("empty_dataset", "the dataset has no rows")
    if spec.loss in losses.NEED_LABELS and "labels" not in columns:
        raise JobFailed(
            "missing_labels",
            f"loss {spec.loss!r} needs a 'labels' array in the dataset; add one, or use "
            "loss 'distill', which needs none",
        )
    eval_batches = (
        datasets.batches(held_out, 10_000, size, device) if held_out is not None else calibration
    )
    report({"stage": "measuring", "percent": 0})
    loss_fn = losses.make_loss(spec.loss, net, loaded.pooling)
    example = models.example_inputs(loaded, batch=calibration[0], device=device)
    seconds["load"] = time.perf_counter() - clock

    before = _measure(net, eval_batches, loss_fn, example)
    config = prune_config(spec)
    metric, steps = config.target_metric, config.steps

    history: list[dict[str, Any]] = []

    def on_step(record: StepRecord) -> None:
        with torch.no_grad():  # one batch: the loss's trend, at the cost of one forward pass
            loss = evaluation.evaluate(net, calibration[:1], loss_fn)["loss"]
        history.append(
            {"step": record.step, "macs": record.macs, "params": record.params, "loss": loss}
        )
        report(
            {
                "stage": "pruning",
                "step": record.step,
                "total": steps,
                "percent": round(100 * record.step / steps, 1),
                "macs": record.macs,
                "params": record.params,
                "loss": loss,
            }
        )

    clock = time.perf_counter()
    result = prune_(net, example, calibration, loss_fn, config, on_step=on_step)
    seconds["prune"] = time.perf_counter() - clock
    if not result.target_met:  # never a success that missed its target
        reached = result.macs / result.initial_macs
        if metric == "params":
            reached = result.params / result.initial_params
        raise JobFailed(
            "target_unreachable",
            f"pruning stopped at {reached:.4f} of the {metric} (target {config.target:g}): "
            "floors or the output format's uniform widths allow no more; ask for "
            f"{reached:.4f} or more",
        )
    after_pruning = _measure(net, eval_batches, loss_fn, example)
    after_finetune = None
    if spec.finetune is not None:
        epochs = spec.finetune.epochs
        report({"stage": "finetuning", "epoch": 0, "epochs": epochs, "percent": 0})

        def on_batch(epoch: int, batch: int) -> None:
            if batch == len(calibration) - 1:  # an epoch ended: say so (and see a cancel)
                done = epoch + 1
                percent = round(100 * done / epochs, 1)
                report({"stage": "finetuning", "epoch": done, "epochs": epochs, "percent": percent})
            else:
                check()

        clock = time.perf_counter()
        finetune.finetune_(
            net,
            calibration,
            loss_fn,
            epochs,
            spec.finetune.lr,
            masks=result.masks,
            on_batch=on_batch,
        )
        seconds["finetune"] = time.perf_counter() - clock
        after_finetune = _measure(net, eval_batches, loss_fn, example)

    clock = time.perf_counter()
    cpu_example = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in example.items()}
    exports = []
    for done, fmt in enumerate(spec.outputs):
        percent = round(100 * done / len(spec.outputs), 1)
        report({"stage": "exporting", "format": fmt, "percent": percent})
        exports.append(
            export.export(fmt, net.cpu(), cpu_example, loaded.directory, files.work, result.plan)
        )
    seconds["export"] = time.perf_counter() - clock
    outcome = {
        "before": before,
        "after_pruning": after_pruning,
        "after_finetune": after_finetune,
        "params_before": result.initial_params,
        "params_after": result.params,
        "macs_before": result.initial_macs,
        "macs_after": result.macs,
        "target_met": result.target_met,
        "sparsity": result.sparsity,
        # MACs and latency refer to one row of this shape
        "example_inputs": {
            k: list(v.shape) for k, v in example.items() if isinstance(v, torch.Tensor)
        },
        "config_updates": result.config_updates,
        "widths": result.history[-1].widths if result.history else {},
        # per pruning step: MACs, params and the loss on the first calibration batch
        "steps": history,
        "evaluated_on": "held_out" if held_out is not None else "calibration",
        "exports": {e.format: e.checks for e in exports},
        "seconds": seconds,
    }
    if spec.mlflow is not None:
        report({"stage": "tracking", "percent": 100})
        outcome["mlflow"] = tracking.log_job(spec, outcome, exports)
    return outcome, exports


def prune_config(spec: JobSpec) -> PruneConfig:
    """The engine's configuration for a job: the one place a spec becomes a PruneConfig."""
    return PruneConfig(
        method=spec.method,
        granularity=spec.granularity,
        target_metric=cast(TargetMetric, spec.target.metric),
        target=spec.target.value,
        steps=spec.schedule.steps,
        schedule=spec.schedule.kind,
        global_ranking="hf" not in spec.outputs,  # hf: widths a config can describe
        hidden_size=spec.hidden_size,
        depth_share=spec.depth_share,
    )


def _check_hf_output(net: torch.nn.Module, granularity: str) -> None:
    """Fail before pruning when a Hugging Face config could not describe the result."""
    if not hasattr(net, "save_pretrained"):
        raise JobFailed(
            "invalid_output",
            "the hf output needs a Hugging Face model; choose safetensors, onnx or pt2",
        )
    describable = architectures.is_transformer(net) or architectures.describes_stage_widths(net)
    if granularity == "channel" and not describable:
        raise JobFailed(
            "invalid_output",
            f"the config of {type(net).__name__} cannot describe "
            "pruned channels; choose safetensors, onnx or pt2 (or unstructured)",
        )


def _measure(
    net: torch.nn.Module,
    batches: list[dict[str, Any]],
    loss_fn: losses.LossFn,
    example: dict[str, Any],
) -> dict[str, float]:
    metrics = evaluation.evaluate(net, batches, loss_fn)
    metrics["latency_ms"] = evaluation.latency_ms(net, example)
    return metrics
