"""A job's steps, free of the database and the queue (tests call them directly):
load → measure → prune (with progress) → measure → fine-tune → measure → export."""

import copy
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

from service.errors import CodedError
from service.jobs.results import (
    ExportChecks,
    JobResult,
    Latency,
    Member,
    Metrics,
    Progress,
    Step,
)
from service.jobs.schemas import JobSpec, Target
from worker import (
    datasets,
    evaluation,
    export,
    finetune,
    latency,
    losses,
    memory,
    microbatch,
    models,
    precision,
    tracking,
)
from worker.engine import (
    PruneConfig,
    PruneResult,
    StepRecord,
    TargetUnreachable,
    architectures,
    measure,
    prune_,
)
from worker.engine.config import TargetMetric
from worker.engine.plan import Plan


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


Report = Callable[[Progress], None]


def execute(
    spec: JobSpec,
    files: JobFiles,
    device: torch.device,
    trusted: bool,
    report: Report,
    check: Callable[[], None] = lambda: None,
    memory_limit: int = 0,
) -> tuple[JobResult, list[export.Exported]]:
    """Run the job. `report` receives progress at every stage and may raise to stop it
    (cancellation); `check` is the cheap form, called between fine-tuning batches, and raises
    the same way (the lifecycle's reads the state its background heartbeat keeps).
    `memory_limit` caps the bytes the job may use (0: what the device has free)."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    report(Progress(stage="loading", percent=0))
    loaded = models.load(files.model_root, files.model_format, trusted=trusted)
    memory.check_fits(loaded.model, device, memory_limit)
    saved = precision.saved_dtype(loaded.model)  # what the outputs are written in
    working = precision.compute_dtype(saved, device)
    net = loaded.model.to(device=device, dtype=working)
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
    calibration = datasets.batches(columns, spec.calibration.batches, size, device, working)
    if not calibration:
        raise JobFailed("empty_dataset", "the dataset has no rows")
    if spec.loss in losses.NEED_LABELS and "labels" not in columns:
        raise JobFailed(
            "missing_labels",
            f"loss {spec.loss!r} needs a 'labels' array in the dataset; add one, or use "
            "loss 'distill', which needs none",
        )
    eval_batches = (
        datasets.batches(held_out, 10_000, size, device, working)
        if held_out is not None
        else calibration
    )
    report(Progress(stage="measuring", percent=0))
    loss_fn = losses.make_loss(spec.loss, net, loaded.pooling)
    room = memory.free_bytes(device, memory_limit)
    if spec.calibration.max_memory is not None:
        room = min(room, spec.calibration.max_memory)
    pass_rows = microbatch.rows_per_pass(net, loss_fn, calibration[0], room)
    calibration = microbatch.split(calibration, pass_rows)
    example = models.example_inputs(loaded, batch=calibration[0], device=device)
    seconds["load"] = time.perf_counter() - clock

    distilled = spec.loss == "distill"
    before = _measure(net, eval_batches, loss_fn, example, seconds, is_teacher=distilled)
    goals = spec.goals
    budget = steps_per_goal(spec.schedule.steps, [goal.value for goal in goals])
    family = spec.targets is not None
    history: list[Step] = []
    members: list[Member] = []
    exports: list[export.Exported] = []
    plan = Plan()
    original: dict[str, int] = {}
    # where the time goes: "score" and "recalibrate" (BatchNorm statistics) are parts of "prune"
    seconds |= {"prune": 0.0, "score": 0.0, "recalibrate": 0.0, "finetune": 0.0, "export": 0.0}
    # the exporters trace the model on the CPU, in the dtype it is written in
    cpu_example = {
        k: precision.cast(v.cpu(), saved) if isinstance(v, torch.Tensor) else v
        for k, v in example.items()
    }

    def on_step(record: StepRecord) -> None:
        # Each step's loss (mean over the calibration batches) is measured by the next step's
        # scoring pass, or at the end of the target; data-free steps take one batch's pass.
        if history and history[-1].loss is None:
            history[-1].loss = record.loss_before
        loss = None
        if record.loss_before is None:
            with torch.no_grad():
                loss = evaluation.evaluate(net, calibration[:1], loss_fn)["loss"]
        step = len(history) + 1  # counted across the family's targets
        history.append(
            Step(
                step=step,
                macs=record.macs,
                params=record.params,
                loss=loss,
                seconds_scoring=round(record.seconds_scoring, 4),
            )
        )
        report(
            Progress(
                stage="pruning",
                step=step,
                total=sum(budget),
                percent=min(99.0, round(100 * step / sum(budget), 1)),
                macs=record.macs,
                params=record.params,
            )
        )

    timing: dict[str, Any] | None = None
    for goal, steps in zip(goals, budget, strict=True):
        clock = time.perf_counter()
        if goal.metric == "latency_ms":
            result, timing = _prune_to_latency(spec, net, example, calibration, loss_fn, on_step)
        else:
            kept = _kept(original, net, example, goal.metric) if original else 1.0
            # A target the last one already passed still prunes a little: each member is smaller.
            config = prune_config(spec, target=min(goal.value / kept, 0.99), steps=steps)
            result = prune_(net, example, calibration, loss_fn, config, on_step=on_step)
        seconds["prune"] += time.perf_counter() - clock
        seconds["score"] += sum(record.seconds_scoring for record in result.history)
        seconds["recalibrate"] += sum(r.seconds_recalibrating for r in result.history)
        original = original or {"macs": result.initial_macs, "params": result.initial_params}
        reached = _reached(goal.metric, result, original, timing)
        met = _target_met(goal, reached, result)
        if not met:  # never a success (or an export) that missed its target
            raise _unreachable(goal, reached, timing, spec.granularity)
        plan = plan.then(result.plan)
        after_pruning = _measure(net, eval_batches, loss_fn, example, seconds)
        if history and history[-1].loss is None:  # the target's last step
            with torch.no_grad():
                history[-1].loss = (
                    after_pruning.loss  # the same batches, whole
                    if held_out is None
                    else evaluation.evaluate(net, calibration, loss_fn)["loss"]
                )
        after_finetune = None
        if spec.finetune is not None:
            clock = time.perf_counter()
            with precision.master_weights(net, device):
                _finetune(spec, net, calibration, loss_fn, result.masks, report, check)
            seconds["finetune"] += time.perf_counter() - clock
            after_finetune = _measure(net, eval_batches, loss_fn, example, seconds)
        clock = time.perf_counter()
        label = {goal.metric: goal.value} if family else None
        # Written in the dtype the upload was saved in; a copy when that differs, so that the
        # next target of a family goes on from unrounded weights.
        exporting = net if saved == working else copy.deepcopy(net).to(dtype=saved)
        made = _export(
            spec.outputs, exporting, cpu_example, loaded.directory, files.work, plan, label, report
        )
        net.to(device)  # the exporters work on the CPU; the next target prunes on the device
        seconds["export"] += time.perf_counter() - clock
        exports += made
        members.append(
            Member(
                target={goal.metric: goal.value},
                macs_after=result.macs,
                params_after=result.params,
                after_pruning=after_pruning,
                after_finetune=after_finetune,
                widths=result.history[-1].widths if result.history else {},
                target_met=met,
                exports={e.format: ExportChecks.model_validate(e.checks) for e in made},
            )
        )
    last = members[-1]
    outcome = JobResult(
        before=before,
        after_pruning=last.after_pruning,
        after_finetune=last.after_finetune,
        params_before=original["params"],
        params_after=last.params_after,
        macs_before=original["macs"],
        macs_after=last.macs_after,
        target_met=all(member.target_met for member in members),
        sparsity=result.sparsity,
        example_inputs={
            k: list(v.shape) for k, v in example.items() if isinstance(v, torch.Tensor)
        },
        config_updates=plan.config_updates,
        widths=last.widths,
        steps=history,
        evaluated_on="held_out" if held_out is not None else "calibration",
        micro_batch_rows=min(pass_rows, size),
        exports=last.exports,
        seconds=seconds,
        family=members if family else None,  # one per target, each with its own model files
        latency=Latency.model_validate(timing)
        if timing
        else None,  # measured on this worker: before, after, noise, speed-up
    )
    if spec.mlflow is not None:
        report(Progress(stage="tracking", percent=100))
        outcome.mlflow = tracking.log_job(spec, outcome, exports)
    return outcome, exports


def _prune_to_latency(
    spec: JobSpec,
    net: torch.nn.Module,
    example: dict[str, Any],
    calibration: list[dict[str, Any]],
    loss_fn: losses.LossFn,
    on_step: Callable[[StepRecord], None],
) -> tuple[PruneResult, dict[str, Any]]:
    """Prune until one forward pass of the job's batch runs under its latency target here, or
    the floors allow no more: the engine's result and the timings, met or not."""
    goal, rows = spec.target.latency_ms, spec.target.batch
    assert goal is not None
    device = next(net.parameters()).device
    multiple = latency.choose_round_to(device, rows)
    reached = latency.prune_to_latency(
        net,
        example,
        calibration,
        loss_fn,
        lambda kept, round_to: prune_config(spec, target=kept, steps=1, round_to=round_to),
        goal,
        rows,
        multiple,
        on_step,
    )
    return reached.result, reached.report


def _reached(
    metric: str, result: PruneResult, original: dict[str, int], timing: dict[str, Any] | None
) -> float:
    """What the job measured in its target's metric: the fraction of the original MACs or params
    the model keeps, the fraction of the eligible weights zeroed, or the milliseconds of one
    timed forward pass of the target's batch."""
    if metric == "latency_ms":
        assert timing is not None
        return float(timing["after_ms"])
    if metric == "sparsity":
        return result.sparsity or 0.0
    return {"macs": result.macs, "params": result.params}[metric] / original[metric]


def _target_met(goal: Target, reached: float, result: PruneResult) -> bool:
    """At most the target for what is kept (MACs, params, milliseconds), at least it for
    sparsity: counted in whole weights there, as the engine zeroes round(target × eligible)."""
    if goal.metric == "sparsity":
        eligible = sum(mask.numel() for mask in result.masks.values())
        return round(reached * eligible) >= round(goal.value * eligible)
    return reached <= goal.value


def _unreachable(
    goal: Target, reached: float, timing: dict[str, Any] | None, granularity: str
) -> Exception:
    """The failure of a job that missed its target: what it reached, and what to ask for."""
    if goal.metric == "latency_ms":
        assert timing is not None
        return JobFailed(
            "target_unreachable",
            f"the fastest this model ran here was {reached:.3g} ms (±{timing['noise_ms']:.2g}) "
            f"at batch {timing['batch']}, with {timing['macs_ratio']:.3f} of its MACs; floors "
            f"allow no more. Ask for {reached:.3g} ms or more",
        )
    if goal.metric == "sparsity":
        return JobFailed(
            "target_unreachable",
            f"{granularity} pruning zeroed {reached:.4f} of the eligible weights (sparsity "
            f"target {goal.value:g}); ask for {reached:.4f} or less",
        )
    return TargetUnreachable(goal.metric, goal.value, reached)


def steps_per_goal(steps: int, goals: list[float]) -> list[int]:
    """The schedule's steps shared among a family's targets by how far each one shrinks (in log
    space, as the exponential schedule moves), at least one each."""
    if len(goals) == 1:
        return [steps]
    edges = [1.0, *goals]
    shares = [math.log(b / a) / math.log(goals[-1]) for a, b in itertools.pairwise(edges)]
    return [max(1, round(steps * share)) for share in shares]


def _kept(original: dict[str, int], net: torch.nn.Module, example: Any, metric: str) -> float:
    """The fraction of the original MACs or params the model keeps now."""
    cost = measure(net, example)
    return {"macs": cost.macs, "params": cost.params}[metric] / original[metric]


def _finetune(
    spec: JobSpec,
    net: torch.nn.Module,
    calibration: list[dict[str, Any]],
    loss_fn: losses.LossFn,
    masks: Any,
    report: Report,
    check: Callable[[], None],
) -> None:
    assert spec.finetune is not None
    epochs = spec.finetune.epochs
    report(Progress(stage="finetuning", epoch=0, epochs=epochs, percent=0))

    def on_batch(epoch: int, batch: int) -> None:
        if batch == len(calibration) - 1:  # an epoch ended: say so (and see a cancel)
            done = epoch + 1
            percent = round(100 * done / epochs, 1)
            report(Progress(stage="finetuning", epoch=done, epochs=epochs, percent=percent))
        else:
            check()

    finetune.finetune_(
        net, calibration, loss_fn, epochs, spec.finetune.lr, masks=masks, on_batch=on_batch
    )


def _export(
    outputs: Sequence[str],
    net: torch.nn.Module,
    example: dict[str, Any],
    source: Path | None,
    work: Path,
    plan: Plan,
    target: dict[str, float] | None,
    report: Report,
) -> list[export.Exported]:
    """Every output format of the model as it is now; a family member's files are named by its
    target (`model-hf.macs-0.5.zip`) and carry it."""
    made = []
    folder = work / "-".join(f"{k}-{v:g}" for k, v in target.items()) if target else work
    folder.mkdir(exist_ok=True)
    for done, fmt in enumerate(outputs):
        percent = round(100 * done / len(outputs), 1)
        report(Progress(stage="exporting", format=fmt, percent=percent, target=target))
        exported = export.export(fmt, net.cpu(), example, source, folder, plan)
        if target:
            suffix = "".join(exported.path.suffixes[-1:])
            name = f"{exported.path.name.removesuffix(suffix)}.{folder.name}{suffix}"
            renamed = exported.path.rename(exported.path.with_name(name))
            exported = replace(exported, path=renamed, target=target)
        made.append(exported)
    return made


def prune_config(
    spec: JobSpec,
    *,
    target: float | None = None,
    steps: int | None = None,
    round_to: int | None = None,
) -> PruneConfig:
    """The engine's configuration for a job: the one place a spec becomes a PruneConfig. A
    family's later targets and a latency target's rounds prune the model as it is then:
    `target` relative to it (a fraction of its MACs, for a latency)."""
    latency_target = spec.target.metric == "latency_ms"
    return PruneConfig(
        method=spec.method,
        granularity=spec.granularity,
        target_metric=cast(TargetMetric, "macs" if latency_target else spec.target.metric),
        target=spec.target.value if target is None else target,
        steps=spec.schedule.steps if steps is None else steps,
        round_to=round_to,
        schedule=spec.schedule.kind,
        global_ranking=not spec.uniform_widths,
        hidden_size=spec.hidden_size,
        depth_share=spec.depth_share,
        normalisation=spec.normalisation,
    )


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


def _measure(
    net: torch.nn.Module,
    batches: list[dict[str, Any]],
    loss_fn: losses.LossFn,
    example: dict[str, Any],
    seconds: dict[str, float],
    is_teacher: bool = False,
) -> Metrics:
    """Loss (and accuracy) on the evaluation batches and latency; its time adds to "measure".
    `is_teacher`: the model is still the distillation loss's teacher (nothing is pruned yet),
    so its loss is 0 by definition, and only accuracy, where labels are classes, takes a pass."""
    clock = time.perf_counter()
    if is_teacher and not any(evaluation.class_labels(batch) is not None for batch in batches):
        metrics = {"loss": 0.0}
    else:
        metrics = evaluation.evaluate(net, batches, loss_fn)
    latency_ms = evaluation.latency_ms(net, example)
    seconds["measure"] = seconds.get("measure", 0.0) + time.perf_counter() - clock
    return Metrics(**metrics, latency_ms=latency_ms)
