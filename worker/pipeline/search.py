"""Choosing a job's allocation by how it recovers (issue 23): no one allocation rule wins
everywhere once the model is fine-tuned (docs/decisions/0007-lamp-normaliser-as-an-option.md),
so a job with `search.candidates` > 1 prunes a copy of the loaded model per candidate, gives
each the same recovery (a short one on calibration rows, or the job's fine-tune), judges each
on held-out rows, and goes on with the best. A candidate whose short recovery raises its
held-out loss (a learning rate too strong for a model pruned a little) is judged, and goes on,
as it was before it; one that misses the target drops out. Why it is opt-in and judged this way:
docs/decisions/0014-search-is-opt-in-and-judged-after-recovery.md.

The candidates are the spec's own normalisation, schedule and cost-awareness, then the others
in the order the benchmarks favour after fine-tuning: a transformer's (`PREFERENCE`, the
sentence embedder's), or, for a model without attention heads, LAMP's widths first
(`PREFERENCE_WITHOUT_HEADS`, the quality benchmarks' CNNs). A job that removes
whole blocks searches how instead (`depth_plans`): which blocks (the loss change now, or the
block influence that recovers better on the tiny LLM) and, with widths, how much of the
reduction depth takes.
The short recovery (`search.recovery` "short") is AdamW with the job's loss (a causal LM's: KL
from the loaded model, `recovery_loss`) and learning rate (`finetune.lr`, else
`DEFAULT_RECOVERY_LR`) over the first `search.recovery_rows` calibration rows, the same rows in
the same order, under the same seed, for every candidate, judged by the job's loss. With
"finetune" each candidate gets the job's whole fine-tune instead, under the same seed, and the
judge is what a user keeps the model for: held-out accuracy where the labels are classes (ties:
the loss), else the loss; the winner is then not fine-tuned again."""

import copy
import hashlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from service.jobs.results import Candidate, Progress
from service.jobs.schemas import Finetune, JobSpec
from worker.engine import PruneConfig, PruneResult, TargetUnreachable, prunes_hidden_size
from worker.engine.architectures import is_transformer
from worker.pipeline import evaluation, finetune, precision
from worker.pipeline.inputs import Batch, Inputs
from worker.pipeline.losses import LossFn

Report = Callable[[Progress], None]
Pruned = TypeVar("Pruned")  # what the caller's pruning gives back, carried to the winner


class Allocation(NamedTuple):
    """How a candidate spreads the pruning over layers: the spec's fields of these names."""

    normalisation: str
    schedule: str
    cost_aware: bool = True

    def __str__(self) -> str:
        """As a candidate's record names it (`Candidate.allocation`)."""
        cost = "" if self.cost_aware else ", not cost-aware"
        return f"{self.normalisation} + {self.schedule}{cost}"


# Ranked per MAC saved first (lamp + linear led six of eight fine-tuned cells of the CNN
# sweep), then by score alone, which loses right after pruning but fine-tuned better at 2× on
# the CNNs.
_BY_COST_THEN_SCORE = tuple(
    Allocation(normalisation, schedule, cost_aware)
    for cost_aware in (True, False)
    for normalisation, schedule in (
        ("lamp", "linear"),
        ("lamp", "exponential"),
        ("max", "linear"),
        ("max", "exponential"),
    )
)
# LAMP's widths from the weights, by score alone: with the channels by rank sum, alone, as a job
# without a search, it was level with the best peer or ahead in all eight CNN cells over 40
# seeds, pruned and fine-tuned, and ahead of the scores' order (`lamp_weights`, the best right
# after pruning) after fine-tuning on MNIST-1D; the two lead the search of a model without
# attention heads (docs/decisions/0016-lamp-widths-lead-a-cnns-search.md).
# On the sentence embedder `lamp_weights` was behind the default, so a transformer's search
# tries them after the four ranked per MAC (docs/benchmarks/embedder.md).
_LAMP_WIDTHS = (
    Allocation("lamp_rank_sum", "exponential", cost_aware=False),
    Allocation("lamp_weights", "exponential", cost_aware=False),
)
PREFERENCE = (*_BY_COST_THEN_SCORE[:4], *_LAMP_WIDTHS, *_BY_COST_THEN_SCORE[4:])
PREFERENCE_WITHOUT_HEADS = (*_LAMP_WIDTHS, *_BY_COST_THEN_SCORE)
DEFAULT_RECOVERY_LR = Finetune().lr
RECOVERY_SEED = 0  # every candidate's dropout draws the same masks
# what a candidate that pruned to an earlier one's model takes over from it
MEASURED = {
    "blocks_removed",
    "widths",
    "macs",
    "params",
    "loss_after_pruning",
    "loss_after_recovery",
    "accuracy_after_recovery",
    "recovery_kept",
}


def allocations(
    own: Allocation, count: int, uniform: bool = False, transformer: bool = True
) -> list[Allocation]:
    """The first `count` allocations a search tries, in order: `own` first, then the others of
    `PREFERENCE` (a `transformer`'s: a model with attention heads) or of
    `PREFERENCE_WITHOUT_HEADS`. With `uniform` widths (an `hf` output) every group gives up the
    same fraction whatever the normaliser and the ranking, so only the schedules differ: one
    each, at most two."""
    order = PREFERENCE if transformer else PREFERENCE_WITHOUT_HEADS
    tried = [own, *(allocation for allocation in order if allocation != own)]
    if uniform:
        schedules = [allocation.schedule for allocation in tried]
        tried = [a for i, a in enumerate(tried) if a.schedule not in schedules[:i]]
    return tried[:count]


def depth_plans(depth_share: float, block_score: str, widths: bool) -> list[tuple[float, str]]:
    """The (depth_share, block_score) pairs a search of a job that removes blocks tries, in
    order: the spec's, the other block score, then (with widths to take the rest) half the
    depth share with each."""
    other = "influence" if block_score == "loss" else "loss"
    plans = [(depth_share, block_score), (depth_share, other)]
    if widths:
        plans += [(depth_share / 2, block_score), (depth_share / 2, other)]
    return plans


def variants(spec: JobSpec, hidden_size: bool = False, transformer: bool = True) -> list[JobSpec]:
    """The spec once per candidate, in the order tried: its own allocation first, then those
    `allocations` gives a `transformer` or another model.
    `hidden_size`: the model's hidden size is pruned where the spec leaves it to the model
    (`hidden_size` null); under uniform widths, where the pairs are few, the search then also
    tries each pair with the hidden size kept."""
    count = spec.search.candidates
    if spec.removes_blocks:
        plans = depth_plans(spec.depth_share, spec.block_score, spec.granularity == "channel")
        return [
            spec.model_copy(update={"depth_share": share, "block_score": score})
            for share, score in plans[:count]
        ]
    own = Allocation(spec.normalisation, spec.schedule.kind, spec.cost_aware)
    tried = allocations(own, count, spec.uniform_widths, transformer)
    switches: list[bool | None] = [spec.hidden_size]
    if hidden_size and spec.uniform_widths and spec.hidden_size is None:
        switches.append(False)
    return [
        spec.model_copy(
            update={
                "normalisation": allocation.normalisation,
                "schedule": spec.schedule.model_copy(update={"kind": allocation.schedule}),
                "cost_aware": allocation.cost_aware,
                "hidden_size": switch,
            }
        )
        for switch in switches
        for allocation in tried
    ][:count]


def choose(
    spec: JobSpec,
    inputs: Inputs,
    device: torch.device,
    prune: Callable[[JobSpec, nn.Module, Report], tuple[Pruned, PruneResult, float]],
    report: Report,
    check: Callable[[], None],
) -> tuple[Pruned, nn.Module, list[Candidate]]:
    """The candidate that recovers best: what `prune` gave back for it, its model (pruned and
    recovered, or only pruned where a short recovery raised its held-out loss; with
    `search.recovery` "finetune", pruned and fine-tuned) and every candidate's record.
    `prune(variant, net, report)` prunes `net` in place as the job prunes under the variant's
    allocation and returns its loss on the held-out batches right after.
    A candidate whose pruning misses the target drops out (its record says why); the job
    fails as a job without a search would only when every one misses, with the first's
    error. The models that lose are dropped as soon as they do."""
    config = PruneConfig(global_ranking=not spec.uniform_widths, hidden_size=spec.hidden_size)
    hidden_size = prunes_hidden_size(inputs.net, inputs.example, config)
    tried = variants(spec, hidden_size, is_transformer(inputs.net))
    recovery = _recovery(spec, inputs, device, check)
    records: list[Candidate] = []
    seen: dict[str, int] = {}  # a pruned model's weights -> the first candidate that had them
    best: tuple[Pruned, nn.Module, Candidate] | None = None
    first_miss: TargetUnreachable | None = None
    # with the job's fine-tune in it, a candidate's pruning is the first half of its progress
    pruning_share = 50.0 if spec.search.finetunes else 100.0
    for index, variant in enumerate(tried):
        relabelled = _searching(report, index, len(tried), 0.0, pruning_share)
        relabelled(Progress(percent=0))
        net = copy.deepcopy(inputs.net)
        try:
            pruned, result, after_pruning = prune(variant, net, relabelled)
        except TargetUnreachable as missed:
            first_miss = first_miss or missed
            records.append(_candidate(variant, missed=str(missed)))
            continue
        finally:
            relabelled(Progress(percent=100))
        same = seen.setdefault(_fingerprint(net), len(records))
        if same != len(records):  # pruned to the very same weights: judged already, no winner
            records.append(_same_as(records[same], variant, same))
            del net, pruned, result
            continue
        if spec.search.finetunes:
            tuning = _searching(report, index, len(tried), pruning_share, 100.0)
            measured = recovery.measure_(net, result.masks, _epochs(tuning, recovery.epochs))
            after_recovery, kept, accuracy = measured["loss"], True, measured.get("accuracy")
        else:
            after_recovery, kept = recovery.apply_unless_worse_(net, result.masks, after_pruning)
            accuracy = None
        record = _candidate(
            variant,
            blocks_removed=_blocks_removed(variant, result),
            widths=result.history[-1].widths if result.history else {},
            macs=result.macs,
            params=result.params,
            loss_after_pruning=after_pruning,
            loss_after_recovery=after_recovery,
            accuracy_after_recovery=accuracy,
            recovery_kept=kept,
        )
        records.append(record)
        if best is None or _rank(record) < _rank(best[2]):
            best = (pruned, net, record)  # ties: the earlier
        del net, pruned, result  # a loser's model goes now, not at the next copy
    if best is None:
        assert first_miss is not None
        raise first_miss
    best[2].chosen = True
    best[2].why = _why(records, best[2], _judged_after(spec))
    return best[0], best[1], records


def _recovery(
    spec: JobSpec, inputs: Inputs, device: torch.device, check: Callable[[], None]
) -> "Recovery":
    """What every candidate recovers by: the job's fine-tune (`search.recovery` "finetune"),
    else the short recovery over the first `recovery_rows` calibration rows."""
    if spec.search.finetunes:
        assert spec.finetune is not None  # the spec's validation asks for it
        return Recovery(
            inputs.calibration,
            inputs.finetune_loss(spec),
            spec.finetune.lr,
            inputs.evaluation,
            device,
            check,
            inputs.loss_fn,
            epochs=spec.finetune.epochs,
        )
    lr = spec.finetune.lr if spec.finetune is not None else DEFAULT_RECOVERY_LR
    batches = recovery_batches(inputs.calibration, spec.search.recovery_rows)
    return Recovery(
        batches, recovery_loss(spec, inputs), lr, inputs.evaluation, device, check, inputs.loss_fn
    )


def _judged_after(spec: JobSpec) -> str:
    if spec.search.finetunes:
        assert spec.finetune is not None
        epochs = spec.finetune.epochs
        return f"the job's fine-tuning ({epochs} epoch{'s' if epochs != 1 else ''})"
    rows = spec.search.recovery_rows
    return f"{rows} rows of recovery (undone where it raised the loss)"


def _rank(record: Candidate) -> tuple[float, float]:
    """A measured candidate's place, lowest first: by held-out accuracy after the job's
    fine-tune where one was measured (ties: the loss), else by its loss as it goes on."""
    loss, accuracy = judged(_going_on(record)), record.accuracy_after_recovery
    if accuracy is None:
        return loss, 0.0
    return (-accuracy, loss) if math.isfinite(loss) else (math.inf, math.inf)


def recovery_loss(spec: JobSpec, inputs: Inputs) -> LossFn:
    """What a candidate recovers on: the job's loss, except a causal LM's, which recovers as
    Minitron does, by KL from the uploaded model on every next-token distribution (the model's
    own distributions carry more than the one token the data has at each position); a
    family's later members too distil from the uploaded model."""
    if spec.loss != "causal_lm":
        return inputs.loss_fn
    assert inputs.distill_fn is not None  # load_inputs keeps it for a causal LM's search
    return inputs.distill_fn


@dataclass(frozen=True)
class Recovery:
    """The recovery every candidate gets (`recover_`: a short one, or `epochs` of the job's
    fine-tune), and the held-out rows that judge it (by `judge`, else by the loss it recovers
    on)."""

    batches: list[Batch]
    loss_fn: LossFn
    lr: float
    held_out: list[Batch]
    device: torch.device
    check: Callable[[], None]
    judge: LossFn | None = None
    epochs: int = 1

    def measure_(
        self,
        net: nn.Module,
        masks: dict[str, Tensor],
        epoch_ended: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """Recover `net` and measure it on the held-out rows: the loss and, where the labels
        are classes, the accuracy. `epoch_ended(epochs done)` after each epoch."""
        last = len(self.batches) - 1

        def on_batch(epoch: int, batch: int) -> None:
            self.check()
            if epoch_ended is not None and batch == last:
                epoch_ended(epoch + 1)

        recover_(
            net, self.batches, self.loss_fn, self.lr, masks, self.device, on_batch, self.epochs
        )
        return evaluation.evaluate(net, self.held_out, self.judge or self.loss_fn)

    def apply_unless_worse_(
        self, net: nn.Module, masks: dict[str, Tensor], before: float
    ) -> tuple[float, bool]:
        """Recover `net` and measure it; where its held-out loss is not lower than `before`
        (the loss right after pruning), put the weights from before back. Returns the loss
        after recovery and whether the recovery was kept."""
        weights = copy.deepcopy(net.state_dict())
        after = self.measure_(net, masks)["loss"]
        kept = judged(after) < judged(before)
        if not kept:
            net.load_state_dict(weights)
        return after, kept


def _candidate(variant: JobSpec, **measured: Any) -> Candidate:
    depth = variant.removes_blocks
    return Candidate(
        normalisation=variant.normalisation,
        schedule=variant.schedule.kind,
        block_score=variant.block_score if depth else None,
        hidden_size=False if variant.hidden_size is False else None,
        # blocks alone (granularity "layer") rank no channels
        cost_aware=None if variant.cost_aware or variant.granularity == "layer" else False,
        depth_share=variant.depth_share if depth and variant.granularity == "channel" else None,
        **measured,
    )


def _fingerprint(net: nn.Module) -> str:
    """A digest of every parameter and buffer, names, shapes and bytes: two candidates whose
    allocations prune to the same model (the same blocks, the same channels) share it."""
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _same_as(earlier: Candidate, variant: JobSpec, index: int) -> Candidate:
    """A candidate that pruned to an earlier one's model: its numbers, not recovered again,
    never chosen (a tie goes to the earlier)."""
    measured = earlier.model_dump(include=MEASURED)
    return _candidate(variant, same_as=index + 1, **measured)


def _blocks_removed(variant: JobSpec, result: PruneResult) -> list[int] | None:
    """The blocks a depth candidate removed, numbered as in the loaded model (the plan records
    each one's position at its removal)."""
    if not variant.removes_blocks:
        return None
    plan = result.plan
    if not plan.blocks_removed:
        return []
    blocks = result.model.get_submodule(plan.block_container)
    assert isinstance(blocks, nn.ModuleList)
    left = len(blocks)
    remaining = list(range(left + len(plan.blocks_removed)))
    return sorted(remaining.pop(position) for position in plan.blocks_removed)


def recovery_batches(calibration: list[Batch], rows: int) -> list[Batch]:
    """The first `rows` calibration rows, in batches as they come (again from the first batch
    when there are fewer rows; the last batch cut to fit)."""
    batches: list[Batch] = []
    for batch in itertools.cycle(calibration):
        size = _rows(batch)
        if size >= rows:
            batches.append({k: _first(v, rows) for k, v in batch.items()})
            return batches
        batches.append(batch)
        rows -= size
    raise AssertionError("unreachable: calibration is never empty")


def recover_(
    net: nn.Module,
    batches: list[Batch],
    loss_fn: LossFn,
    lr: float,
    masks: dict[str, Tensor],
    device: torch.device,
    on_batch: Callable[[int, int], None],
    epochs: int = 1,
) -> None:
    """`epochs` passes of AdamW over `batches`, masks kept, under a fixed seed (the caller's
    random state is left as it was); `on_batch(epoch, batch)` after each step (it may raise
    to stop)."""
    forked = [device] if device.type == "cuda" else []
    with precision.master_weights(net, device), torch.random.fork_rng(devices=forked):
        torch.manual_seed(RECOVERY_SEED)
        finetune.finetune_(net, batches, loss_fn, epochs, lr, masks=masks, on_batch=on_batch)


def _epochs(report: Report, epochs: int) -> Callable[[int], None]:
    """A candidate's fine-tune, epoch by epoch, as its progress in the search (its start
    said now)."""

    def epoch_ended(done: int) -> None:
        report(Progress(percent=100 * done / epochs, epoch=done, epochs=epochs))

    epoch_ended(0)
    return epoch_ended


def _searching(report: Report, index: int, count: int, start: float, end: float) -> Report:
    """Progress of one candidate as the search's, the candidate's percent mapped onto `start`
    .. `end` of its share: its pruning steps and its end, or its fine-tune's epochs, with the
    candidate's number and the percent of the whole search."""

    def relabelled(progress: Progress) -> None:
        within = start + (end - start) * (progress.percent or 0) / 100
        share = (index + within / 100) / count
        report(
            progress.model_copy(
                update={
                    "stage": "searching",
                    "candidate": index + 1,
                    "candidates": count,
                    "percent": round(100 * share, 1),
                }
            )
        )

    return relabelled


def _why(records: list[Candidate], chosen: Candidate, after: str) -> str:
    judged_ones = [r for r in records if r.missed is None and r.same_as is None]
    by_accuracy = chosen.accuracy_after_recovery is not None
    figure = _accuracy if by_accuracy else _going_on
    digits = _digits([figure(r) for r in judged_ones])

    def named(record: Candidate) -> str:
        undone = "" if record.recovery_kept else ", recovery undone"
        return f"{figure(record):.{digits}g} ({record.allocation}{undone})"

    others = ", ".join(named(r) for r in judged_ones if r is not chosen) or "no other"
    missed = [r.allocation for r in records if r.missed is not None]
    dropped = f"; {', '.join(missed)} missed the target" if missed else ""
    dropped += "".join(
        f"; {r.allocation} pruned to the model of candidate {r.same_as}"
        for r in records
        if r.same_as is not None
    )
    tied = by_accuracy and any(
        r is not chosen and r.accuracy_after_recovery == chosen.accuracy_after_recovery
        for r in judged_ones
    )
    dropped += "; the accuracy tied, the lower held-out loss won" if tied else ""
    best = "highest held-out accuracy" if by_accuracy else "lowest held-out loss"
    return f"{best} after {after}: {named(chosen)} against {others}{dropped}"


def _accuracy(record: Candidate) -> float:
    assert record.accuracy_after_recovery is not None
    return record.accuracy_after_recovery


def _going_on(record: Candidate) -> float:
    """A measured candidate's held-out loss as it would go on: recovered or not."""
    loss = record.loss_after_recovery if record.recovery_kept else record.loss_after_pruning
    assert loss is not None
    return loss


def _digits(losses: list[float]) -> int:
    """Significant digits enough to tell the losses apart (4 to 8): equal ones stay equal."""
    distinct = len(set(losses))
    return next(
        (d for d in range(4, 9) if len({f"{loss:.{d}g}" for loss in losses}) == distinct), 8
    )


def judged(loss: float) -> float:
    """A loss that is not finite never wins."""
    return loss if math.isfinite(loss) else math.inf


def _rows(batch: Batch) -> int:
    return next(v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim())


def _first(value: Any, rows: int) -> Any:
    return value[:rows] if isinstance(value, Tensor) and value.dim() else value
