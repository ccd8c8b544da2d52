"""A job's steps, free of the database and the queue (tests call them directly):
load → measure → prune (with progress) → measure → fine-tune → measure → export.

`JobFiles` and `JobFailed` (worker/pipeline/inputs.py) are part of this interface."""

import copy
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch

from service.jobs.results import (
    Candidate,
    ExportChecks,
    JobResult,
    Latency,
    Member,
    Metrics,
    Progress,
    Step,
)
from service.jobs.schemas import JobSpec, Target
from worker.engine import (
    PruneConfig,
    PruneResult,
    StepRecord,
    TargetUnreachable,
    measure,
    prune_,
)
from worker.engine.config import TargetMetric
from worker.engine.plan import Plan
from worker.pipeline import (
    evaluation,
    export,
    finetune,
    latency,
    losses,
    precision,
    search,
    tracking,
)
from worker.pipeline.inputs import Inputs, JobFailed, JobFiles, load_inputs
from worker.pipeline.plugins import register_plugins

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
    register_plugins()  # the scorer or allocation rule a spec names may be a plugin's
    clock = time.perf_counter()
    inputs = load_inputs(spec, files, device, trusted, memory_limit, report)
    run = _Run(spec, files, device, inputs, report, check)
    run.seconds["load"] = time.perf_counter() - clock
    # the distillation loss's teacher is the model itself until pruning starts
    before = run.measure(is_teacher=spec.loss == "distill")
    for goal, steps in zip(spec.goals, run.budget, strict=True):
        run.members.append(run.reach(goal, steps))
    result = run.result(before)
    if spec.mlflow is not None:
        report(Progress(stage="tracking", percent=100))
        result.mlflow = tracking.log_job(spec, result, run.exports)
    return result, run.exports


@dataclass
class _Run:
    """A job between its stages: the model as pruned so far and what each stage recorded."""

    spec: JobSpec
    files: JobFiles
    device: torch.device
    inputs: Inputs
    report: Report
    check: Callable[[], None]
    steps: list[Step] = field(default_factory=list)  # counted across a family's targets
    members: list[Member] = field(default_factory=list)
    exports: list[export.Exported] = field(default_factory=list)
    plan: Plan = field(default_factory=Plan)
    original: dict[str, int] = field(default_factory=dict)  # MACs and params before pruning
    timing: dict[str, Any] | None = None  # a latency target's measurements
    sparsity: float | None = None
    candidates: list[Candidate] | None = None  # a search's
    # the chosen candidate's held-out metrics right after pruning, where the search fine-tunes
    at_pruning: dict[str, float] | None = None
    # where the time goes: "score" and "recalibrate" (BatchNorm statistics) are parts of "prune"
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("prune", "score", "recalibrate", "finetune", "export"), 0.0
        )
    )

    @property
    def budget(self) -> list[int]:
        return steps_per_goal(self.spec.schedule.steps, [goal.value for goal in self.spec.goals])

    def reach(self, goal: Target, steps: int) -> Member:
        """Prune to `goal` (refused if missed), measure, fine-tune, export: one member."""
        searching = self.spec.search.candidates > 1
        result, met = self.search(goal, steps) if searching else self.prune(goal, steps)
        after_pruning = self.measure()
        self.close_last_step(after_pruning)
        after_finetune = None
        if self.spec.search.finetunes:  # the winner was fine-tuned in the search
            assert self.at_pruning is not None
            after_finetune = after_pruning  # the architecture, so the latency, is the same
            after_pruning = after_finetune.model_copy(update=self.at_pruning)
        elif self.spec.finetune is not None:
            clock = time.perf_counter()
            with precision.master_weights(self.inputs.net, self.device):
                _finetune(self.spec, self.inputs, result.masks, self.report, self.check)
            self.seconds["finetune"] += time.perf_counter() - clock
            after_finetune = self.measure()
        made = self.export(goal)
        return Member(
            target={goal.metric: goal.value},
            macs_after=result.macs,
            params_after=result.params,
            after_pruning=after_pruning,
            after_finetune=after_finetune,
            widths=result.history[-1].widths if result.history else {},
            target_met=met,
            exports={e.format: ExportChecks.model_validate(e.checks) for e in made},
            candidates=self.candidates if searching else None,
        )

    def prune(self, goal: Target, steps: int) -> tuple[PruneResult, bool]:
        """The model pruned to `goal` in `steps` steps, and whether it met it as measured (a
        miss fails the job as `target_unreachable` here: only True comes back)."""
        net, inputs = self.inputs.net, self.inputs
        clock = time.perf_counter()
        if goal.metric == "latency_ms":
            result, self.timing = _prune_to_latency(
                self.spec, net, inputs.example, inputs.calibration, inputs.loss_fn, self.on_step
            )
        else:
            kept = _kept(self.original, net, inputs.example, goal.metric) if self.original else 1
            # A target the last one already passed still prunes a little: each member is smaller.
            config = prune_config(self.spec, target=min(goal.value / kept, 0.99), steps=steps)
            result = prune_(
                net,
                inputs.example,
                inputs.calibration,
                inputs.loss_fn,
                config,
                on_step=self.on_step,
            )
        self.seconds["prune"] += time.perf_counter() - clock
        self.seconds["score"] += sum(record.seconds_scoring for record in result.history)
        self.seconds["recalibrate"] += sum(r.seconds_recalibrating for r in result.history)
        self.original = self.original or {
            "macs": result.initial_macs,
            "params": result.initial_params,
        }
        reached = _reached(goal.metric, result, self.original, self.timing)
        met = _target_met(goal, reached, result)
        if not met:  # never a success (or an export) that missed its target
            raise _unreachable(goal, reached, self.timing, self.spec.granularity)
        self.plan = self.plan.then(result.plan)
        self.sparsity = result.sparsity
        return result, met

    def search(self, goal: Target, steps: int) -> tuple[PruneResult, bool]:
        """Prune a copy of the model per candidate allocation as `prune` does, and go on with
        the one that recovers best (worker/pipeline/search.py): its model, steps and plan
        become the job's. Every candidate's pruning counts in "prune"; the recoveries and
        held-out measurements in "search"."""
        clock = time.perf_counter()
        pruning = self.seconds["prune"]

        def prune(
            variant: JobSpec, net: torch.nn.Module, report: Report
        ) -> tuple[tuple[_Run, PruneResult, bool, dict[str, float]], PruneResult, float]:
            candidate = _Run(
                variant,
                self.files,
                self.device,
                replace(self.inputs, net=net),
                report,
                self.check,
                steps=list(self.steps),  # a family's earlier members' steps, numbered on
                plan=self.plan,
                original=dict(self.original),
                seconds=self.seconds,  # adds its pruning's time to the job's
            )
            result, met = candidate.prune(goal, steps)
            held_out = evaluation.evaluate(net, self.inputs.evaluation, self.inputs.loss_fn)
            after = Metrics(**held_out)
            candidate.close_last_step(after)
            return (candidate, result, met, held_out), result, after.loss

        pruned, net, self.candidates = search.choose(
            self.spec, self.inputs, self.device, prune, self.report, self.check
        )
        chosen, result, met, self.at_pruning = pruned
        self.inputs.net = net
        self.inputs.loaded = replace(self.inputs.loaded, model=net)  # the original can go
        self.steps, self.plan, self.original = chosen.steps, chosen.plan, chosen.original
        self.sparsity = chosen.sparsity
        searched = time.perf_counter() - clock - (self.seconds["prune"] - pruning)
        self.seconds["search"] = self.seconds.get("search", 0.0) + searched
        return result, met

    def on_step(self, record: StepRecord) -> None:
        """Record a pruning step and report it. Each step's loss (mean over the calibration
        batches) is measured by the next step's scoring pass, or at the end of the target;
        data-free steps take one batch's pass."""
        if self.steps and self.steps[-1].loss is None:
            self.steps[-1].loss = record.loss_before
        loss = None
        if record.loss_before is None:
            with torch.no_grad():
                loss = self.evaluate(self.inputs.calibration[:1])
        step, total = len(self.steps) + 1, sum(self.budget)
        self.steps.append(
            Step(
                step=step,
                macs=record.macs,
                params=record.params,
                loss=loss,
                seconds_scoring=round(record.seconds_scoring, 4),
            )
        )
        percent = min(99.0, round(100 * step / total, 1))
        self.report(
            Progress(
                stage="pruning",
                step=step,
                total=total,
                percent=percent,
                macs=record.macs,
                params=record.params,
            )
        )

    def close_last_step(self, after_pruning: Metrics) -> None:
        """The target's last step has no next scoring pass: its loss is measured here."""
        if self.steps and self.steps[-1].loss is None:
            with torch.no_grad():
                self.steps[-1].loss = (
                    after_pruning.loss  # the same batches, whole
                    if not self.inputs.held_out
                    else self.evaluate(self.inputs.calibration)
                )

    def evaluate(self, batches: list[dict[str, Any]]) -> float:
        return evaluation.evaluate(self.inputs.net, batches, self.inputs.loss_fn)["loss"]

    def measure(self, is_teacher: bool = False) -> Metrics:
        """Loss (and accuracy) on the evaluation batches and latency; its time adds to
        "measure". `is_teacher`: the model is still the distillation loss's teacher (nothing
        is pruned yet), so its loss is 0 by definition, and only accuracy, where labels are
        classes, takes a pass."""
        clock = time.perf_counter()
        net, batches = self.inputs.net, self.inputs.evaluation
        if is_teacher and not any(evaluation.class_labels(b) is not None for b in batches):
            metrics = {"loss": 0.0}
        else:
            metrics = evaluation.evaluate(net, batches, self.inputs.loss_fn)
        latency_ms = evaluation.latency_ms(net, self.inputs.example)
        self.seconds["measure"] = self.seconds.get("measure", 0.0) + time.perf_counter() - clock
        return Metrics(**metrics, latency_ms=latency_ms)

    def export(self, goal: Target) -> list[export.Exported]:
        """Every output of the model as it is now, in the dtype the upload was saved in (a
        copy when that differs, so that a family's next target goes on from unrounded
        weights); a family's member's files are named by its target."""
        clock = time.perf_counter()
        inputs = self.inputs
        label = {goal.metric: goal.value} if self.spec.targets is not None else None
        net = inputs.net
        exporting = net if inputs.saved == inputs.working else copy.deepcopy(net).to(inputs.saved)
        made = _export(
            self.spec.outputs,
            exporting,
            inputs.cpu_example(),
            inputs.loaded.directory,
            self.files.work,
            self.plan,
            label,
            self.report,
        )
        net.to(self.device)  # the exporters work on the CPU; the next target prunes on the device
        self.seconds["export"] += time.perf_counter() - clock
        self.exports += made
        return made

    def result(self, before: Metrics) -> JobResult:
        last = self.members[-1]
        return JobResult(
            before=before,
            after_pruning=last.after_pruning,
            after_finetune=last.after_finetune,
            params_before=self.original["params"],
            params_after=last.params_after,
            macs_before=self.original["macs"],
            macs_after=last.macs_after,
            target_met=all(member.target_met for member in self.members),
            sparsity=self.sparsity,
            example_inputs={
                k: list(v.shape)
                for k, v in self.inputs.example.items()
                if isinstance(v, torch.Tensor)
            },
            config_updates=self.plan.config_updates,
            widths=last.widths,
            steps=self.steps,
            evaluated_on="held_out" if self.inputs.held_out else "calibration",
            micro_batch_rows=self.inputs.micro_batch_rows,
            exports=last.exports,
            seconds=self.seconds,
            # one per target, each with its own model files
            family=self.members if self.spec.targets is not None else None,
            # measured on this worker: before, after, noise, speed-up
            latency=Latency.model_validate(self.timing) if self.timing else None,
            candidates=self.candidates,
        )


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
    spec: JobSpec, inputs: Inputs, masks: Any, report: Report, check: Callable[[], None]
) -> None:
    assert spec.finetune is not None
    calibration = inputs.calibration
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
        inputs.net,
        calibration,
        inputs.finetune_loss(spec),
        epochs,
        spec.finetune.lr,
        masks=masks,
        on_batch=on_batch,
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
        block_score=spec.block_score,
        normalisation=spec.normalisation,
        cost_aware=spec.cost_aware,
    )
