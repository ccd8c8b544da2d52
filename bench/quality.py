"""Accuracy of pruning criteria at equal MACs: the engine's methods against Torch-Pruning's.

What is measured, per dataset (`digits`, `mnist1d`), seed and MACs target (50% and 25% of the
dense model's MACs):

- the achieved MACs fraction of the pruned model (counted by the engine's meter for every row);
- test accuracy right after pruning, with BatchNorm statistics re-estimated on the calibration
  batches (the engine does it after every step; the peers get the same routine after every step);
- test accuracy after one epoch of fine-tuning (Adam, lr 1e-3, identical for every row);
- the dense model's test accuracy, for reference.

Our rows call `worker.engine.prune` once per method in `worker.engine.METHODS`, with the default
switches (cost-aware ranking, 10% layer floor, BatchNorm recalibration). The peers are
Torch-Pruning 1.6.1's own `MagnitudeImportance`, `TaylorImportance`, `HessianImportance` (with its
accumulation bug fixed, see `FixedHessianImportance`) and `LAMPImportance`, run by its own
`BasePruner` with global ranking. Torch-Pruning's `pruning_ratio` counts channels, not MACs, so each
peer's channel ratio is searched (regula falsi with bisection safeguards, each probe a full pruning
run on a fresh copy) until its MACs land at or just under the target: every criterion is compared
at the same achieved MACs. Every criterion scores on the same calibration batches.

An ablation turns `oba`'s three allocation switches off one at a time.

`--search K` adds the row `oba, search K` (issue 23): the first K candidate allocations of a
job's search (`worker.pipeline.search.allocations`: the default max + exponential first), each
pruned as the `oba` row is, each given the same short recovery (`search.recover_` over the
first `--recovery-rows` calibration rows, lr 1e-3; undone where it raises the held-out loss, as
in a job), each judged by its loss on the training rows the calibration did not draw; the
lowest is kept. Its "pruned" accuracy is before that recovery,
its fine-tuned accuracy after the recovery and the epoch every row gets. `oba, search 1` (the
default candidate alone, with the same recovery before its epoch) comes with it.
`--search-recovery finetune` does what a job's `search.recovery: "finetune"` does instead: each
candidate gets the epoch every row gets and is judged after it by held-out accuracy (ties: the
loss); the rows are labelled `oba, search K, fine-tuned each`, and the winner gets no second epoch.

Run `python -m bench.quality --help`; `--quick` is a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bench.common import (
    DATASETS,
    Batch,
    Dataset,
    accuracy,
    build_model,
    calibration_batches,
    cross_entropy,
    finetune_one_epoch,
    held_out_batch,
    load_dataset,
    macs,
    markdown_table,
    mean_std,
    recalibrate,
    set_threads,
    split_validation,
    train_epochs,
)
from bench.peers import PEER_MAX_PRUNING_RATIO, FixedHessianImportance, peer_importance
from worker.engine import (
    METHODS,
    PruneConfig,
    prune_,
    register_allocation,
    register_scorer,
    registered_scorer,
)
from worker.engine.allocation import select_units
from worker.engine.groups import ChannelGroup, unit_view
from worker.engine.scores import needs_data
from worker.pipeline import evaluation, search

PEERS = ("tp_magnitude", "tp_taylor", "tp_hessian", "tp_lamp")
ABLATIONS: dict[str, dict[str, Any]] = {
    "oba, cost_aware=False": {"cost_aware": False},
    "oba, layer_floor=0.0": {"layer_floor": 0.0},
    "oba, recalibrate_batchnorm=False": {"recalibrate_batchnorm": False},
}
# Dense training: epochs and peak learning rate (cosine decay), per dataset.
TRAINING = {"digits": (15, 3e-3), "mnist1d": (20, 3e-3)}


@dataclass
class Row:
    """One pruned model: which criterion, where, and how it did."""

    method: str
    dataset: str
    target: float
    seed: int
    macs_fraction: float
    acc_pruned: float
    acc_finetuned: float
    acc_dense: float
    seconds: float  # pruning wall time (for peers: the whole channel-ratio search)
    chosen: str = ""  # a search row: the winning "normalisation + schedule"
    candidates: list[dict[str, Any]] = field(default_factory=list)  # a search row: every one


# --------------------------------------------------------------------------------------------
# Torch-Pruning peers


def per_sample_gradients(model: nn.Module, batch: Batch) -> dict[nn.Parameter, Tensor]:
    """Gradient of each sample's cross-entropy (eval mode), stacked along a leading axis."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def sample_loss(values: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, (values, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, *batch)
    return {p: grads[name] for name, p in model.named_parameters()}


def check_hessian_fix(model: nn.Module, batch: Batch) -> tuple[float, float]:
    """Relative errors against the true mean of squared per-sample gradients on `batch`.

    Returns (Torch-Pruning's own `accumulate_grad` loop, `FixedHessianImportance.
    accumulate_squared`): the first is large (only the last sample is kept), the second ~1e-7.
    """
    model.eval()
    losses = F.cross_entropy(model(batch[0]), batch[1], reduction="none")
    original, fixed = tp.importance.HessianImportance(), FixedHessianImportance()
    truth = {p: torch.zeros_like(p) for p in model.parameters()}
    for i, loss in enumerate(losses):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=i < len(losses) - 1)
        original.accumulate_grad(model)
        for p in model.parameters():
            if p.grad is not None:
                truth[p] += p.grad.pow(2) / len(losses)
    model.zero_grad(set_to_none=True)
    fixed.accumulate_squared(per_sample_gradients(model, batch))

    def error(importance: tp.importance.Importance) -> float:
        return max(
            float(
                (importance._accu_grad[p] / importance._counter[p] - truth[p]).norm()
                / truth[p].norm()
            )
            for p in model.parameters()
        )

    return error(original), error(fixed)


def _prepare_peer_scores(
    name: str, importance: tp.importance.Importance, model: nn.Module, batches: list[Batch]
) -> None:
    """Put what the peer's importance reads (`.grad`, accumulated squares) in place, eval mode."""
    if name not in ("tp_taylor", "tp_hessian"):
        return
    model.eval()
    model.zero_grad(set_to_none=True)
    if name == "tp_taylor":  # gradient of the mean loss over all calibration batches
        for batch in batches:
            (cross_entropy(model, batch) / len(batches)).backward()
        return
    assert isinstance(importance, FixedHessianImportance)
    importance.zero_grad()
    for batch in batches:
        importance.accumulate_squared(per_sample_gradients(model, batch))
    for param in model.parameters():  # HessianImportance writes its averages into `.grad`
        param.grad = torch.zeros_like(param)


def prune_peer(
    name: str,
    dense: nn.Module,
    example: Tensor,
    batches: list[Batch],
    channel_ratio: float,
    steps: int,
) -> nn.Module:
    """A copy of `dense` pruned by Torch-Pruning with `name`'s criterion to `channel_ratio`.

    `steps` re-scored iterative steps (Torch-Pruning's linear channel schedule), BatchNorm
    statistics recalibrated on `batches` after each step, as the engine does.
    """
    model = copy.deepcopy(dense)
    importance = peer_importance(name)
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=importance,
        global_pruning=True,
        pruning_ratio=channel_ratio,
        max_pruning_ratio=PEER_MAX_PRUNING_RATIO,
        iterative_steps=steps,
        ignored_layers=[model.classifier],
    )
    for _ in range(steps):
        _prepare_peer_scores(name, importance, model, batches)
        pruner.step()
        model.zero_grad(set_to_none=True)
        recalibrate(model, batches)
    model.eval()
    return model


def match_macs(
    run: Callable[[float], nn.Module],
    fraction_of: Callable[[nn.Module], float],
    target: float,
    tolerance: float,
    max_probes: int,
    scan: int = 10,
) -> tuple[nn.Module, float, float]:
    """Search the channel ratio whose pruned model keeps the most MACs not above `target`.

    Regula falsi on (ratio, MACs fraction), each guess kept inside the middle 80% of the current
    bracket so a flat stretch cannot stall it. Stops once a feasible model is within `tolerance`
    of the target. Achieved MACs need not be monotone in the ratio (a one-channel change early
    on changes every later step of an iterative run): if the bracket closes on a jump, `scan`
    more ratios around it are tried. Returns (model, MACs fraction, channel ratio).
    """
    lo, f_lo = 0.0, 1.0
    hi = 0.95
    model = run(hi)
    f_hi = fraction_of(model)
    best = (model, f_hi, hi)
    if f_hi > target:  # cannot get there: report the deepest it goes
        return best

    def probe(ratio: float) -> float:
        nonlocal best
        model = run(ratio)
        fraction = fraction_of(model)
        if best[1] < fraction <= target:
            best = (model, fraction, ratio)
        return fraction

    for _ in range(max_probes):
        if target - best[1] <= tolerance or hi - lo < 1e-3:
            break
        guess = lo + (hi - lo) * (f_lo - target) / max(f_lo - f_hi, 1e-12)
        ratio = min(max(guess, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo))
        fraction = probe(ratio)
        if fraction <= target:
            hi, f_hi = ratio, fraction
        else:
            lo, f_lo = ratio, fraction
    if target - best[1] > tolerance and scan > 0:
        start, stop = max(0.0, lo - 0.05), min(0.95, hi + 0.05)
        for i in range(scan):
            probe(start + (stop - start) * (i + 0.5) / scan)
    return best


# --------------------------------------------------------------------------------------------
# Experimental variants of the engine's channel score, through the engine's registries

VARIANTS = ("default", "abs_elements", "mean_norm", "abs_elements+mean_norm")
# Methods whose channel sums `abs_elements` changes: magnitude has its own (the L2 norm) and
# random's scores are never negative.
ABS_METHODS = tuple(m for m in METHODS if m not in ("magnitude", "random"))


def mean_normalised(group: ChannelGroup, channel_scores: Tensor) -> Tensor:
    """Channel scores over the group's mean (Torch-Pruning's default normaliser), summed per
    unit: the engine's `max_normalised` with the mean in place of the max."""
    mean = channel_scores.mean()
    return unit_view(channel_scores / mean if mean > 0 else channel_scores, group)


def register_variants() -> None:
    """Make the variants' methods (`oba_abs`, …) and allocation (`mean_norm`) known to the engine.

    Experimental, for the "what was tried" part of docs/benchmarks/quality.md. `abs_elements`
    sums |element score| over a channel (as Torch-Pruning's Taylor does) instead of |signed sum|
    (as OBA does): each built-in method again, registered with `reduction="abs"`. `mean_norm`
    divides each group's channel scores by their mean (Torch-Pruning's default normaliser)
    instead of their max (LAMP's normaliser is the engine's own switch:
    `--try normalisation="lamp"`). Neither changes which channel ranks first within a group;
    both change how groups compare in the global ranking.
    """
    for method in ABS_METHODS:
        register_scorer(
            f"{method}_abs",
            registered_scorer(method),
            needs_data=needs_data(method),
            reduction="abs",
        )
    register_allocation("mean_norm", select_units, unit_scores=mean_normalised)


def variant_config(variant: str, method: str, switches: dict[str, Any]) -> dict[str, Any]:
    """PruneConfig's method and switches for `method` under `variant` (registered by
    `register_variants`); a row's own switches win over the variant's normalisation."""
    if "abs_elements" in variant and method in ABS_METHODS:
        method = f"{method}_abs"
    normalisation = {"normalisation": "mean_norm"} if "mean_norm" in variant else {}
    return {"method": method, **normalisation, **switches}


# --------------------------------------------------------------------------------------------
# The experiment


@dataclass(frozen=True)
class Settings:
    seeds: int
    datasets: tuple[str, ...]
    targets: tuple[float, ...]
    methods: tuple[str, ...]
    peers: tuple[str, ...]
    ablation: bool
    steps: int
    schedule: str
    calibration_batches: int
    calibration_size: int
    training_scale: float
    tolerance: float
    max_probes: int
    variant: str = "default"
    tries: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # (label, switches) rows
    search: int = 0  # candidates of the `oba, search K` row (0: no such row)
    recovery_rows: int = 256  # calibration rows of each candidate's recovery
    # fraction of the training rows set aside before dense training; the search judges on them
    validation: float = 0.0
    # "finetune": each candidate gets the epoch every row gets and is judged after it by
    # held-out accuracy, as a job's search.recovery "finetune"; the winner gets no second
    search_recovery: str = "short"
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1


def _evaluate(
    method: str,
    model: nn.Module,
    data: Dataset,
    target: float,
    seed: int,
    initial_macs: int,
    acc_dense: float,
    seconds: float,
) -> Row:
    fraction = macs(model, data.example) / initial_macs
    acc_pruned = accuracy(model, data)
    finetune_one_epoch(model, data, seed)
    row = Row(
        method, data.name, target, seed, fraction, acc_pruned, accuracy(model, data), acc_dense,
        seconds,
    )  # fmt: skip
    print(
        f"  {data.name} seed={seed} target={target:.2f} {method:<34} MACs {fraction:.3f}  "
        f"pruned {acc_pruned:.3f}  fine-tuned {row.acc_finetuned:.3f}  ({seconds:.1f}s)",
        flush=True,
    )
    return row


def run_setting(
    settings: Settings, data: Dataset, dense: nn.Module, seed: int, target: float
) -> list[Row]:
    """Every criterion (and the ablation) on one trained model at one MACs target."""
    batches = calibration_batches(
        data, seed, count=settings.calibration_batches, size=settings.calibration_size
    )
    initial = macs(dense, data.example)
    acc_dense = accuracy(dense, data)
    rows = []

    def ours(label: str, method: str, **switches: Any) -> None:
        model = copy.deepcopy(dense)
        config = PruneConfig(
            target_metric="macs",
            target=target,
            steps=settings.steps,
            schedule=settings.schedule,  # type: ignore[arg-type]
            seed=seed,
            **variant_config(settings.variant, method, switches),
        )
        started = time.perf_counter()
        prune_(model, data.example, batches, cross_entropy, config)
        seconds = time.perf_counter() - started
        rows.append(_evaluate(label, model, data, target, seed, initial, acc_dense, seconds))

    for method in settings.methods:
        ours(method, method)
    for peer in settings.peers:
        started = time.perf_counter()
        model, _, _ = match_macs(
            functools.partial(prune_peer, peer, dense, data.example, batches, steps=settings.steps),
            lambda m: macs(m, data.example) / initial,
            target,
            settings.tolerance,
            settings.max_probes,
        )
        seconds = time.perf_counter() - started
        rows.append(_evaluate(peer, model, data, target, seed, initial, acc_dense, seconds))
    if settings.ablation:
        for label, switches in ABLATIONS.items():
            ours(label, "oba", **switches)
    for label, pairs in settings.tries:
        ours(label, "oba", **dict(pairs))
    if settings.search:
        rows += search_rows(settings, data, dense, seed, target, batches)
    return rows


# --------------------------------------------------------------------------------------------
# A search over allocations, judged after recovery (issue 23)

RECOVERY_LR = 1e-3


def search_label(candidates: int, recovery: str = "short") -> str:
    return f"oba, search {candidates}" + (", fine-tuned each" if recovery == "finetune" else "")


def as_job_batch(batch: Batch) -> dict[str, Any]:
    """A bench batch as the worker's pipeline carries one (the model's input by name, labels)."""
    return {"x": batch[0], "labels": batch[1]}


def job_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    return cross_entropy(model, (batch["x"], batch["labels"]))


@dataclass
class Tried:
    """One candidate of a search: its model after recovery and what was measured on the way."""

    allocation: str
    model: nn.Module
    macs_fraction: float
    acc_pruned: float
    acc_recovered: float
    loss_pruned: float
    loss_recovered: float
    recovery_kept: bool  # False: the recovery raised the held-out loss and was undone
    seconds: float  # its pruning, recovery and judging
    held_out_accuracy: float | None = None  # after recovery; what a fine-tuning search judges

    @property
    def going_on(self) -> float:
        """The held-out loss it is judged by: recovered, or as pruned where that was lower."""
        return self.loss_recovered if self.recovery_kept else self.loss_pruned

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def search_rows(
    settings: Settings, data: Dataset, dense: nn.Module, seed: int, target: float, batches: list
) -> list[Row]:
    """`oba, search K` and `oba, search 1` for one cell: the first K allocations of a job's
    search, each pruned as the `oba` row is, recovered on the first `recovery_rows`
    calibration rows and judged by its loss on the training rows calibration did not draw
    (ties: the earlier); the winner gets the epoch of fine-tuning every row gets."""
    initial = macs(dense, data.example)
    acc_dense = accuracy(dense, data)
    first = search.recovery_batches([as_job_batch(b) for b in batches], settings.recovery_rows)
    held_out = [
        as_job_batch(
            held_out_batch(
                data, seed, count=settings.calibration_batches, size=settings.calibration_size
            )
        )
    ]
    cpu = torch.device("cpu")
    recovery = search.Recovery(first, job_loss, RECOVERY_LR, held_out, cpu, _go_on)
    tried: list[Tried] = []
    own = search.Allocation("max", settings.schedule)
    for allocation in search.allocations(own, settings.search, transformer=False):
        started = time.perf_counter()
        model = copy.deepcopy(dense)
        switches = {"normalisation": allocation.normalisation, "cost_aware": allocation.cost_aware}
        config = PruneConfig(
            target_metric="macs",
            target=target,
            steps=settings.steps,
            schedule=allocation.schedule,  # type: ignore[arg-type]
            seed=seed,
            **variant_config(settings.variant, "oba", switches),
        )
        result = prune_(model, data.example, batches, cross_entropy, config)
        acc_pruned = accuracy(model, data)
        loss_pruned = evaluation.evaluate(model, held_out, job_loss)["loss"]
        held_out_accuracy = None
        if settings.search_recovery == "finetune":
            finetune_one_epoch(model, data, seed)
            measured = evaluation.evaluate(model, held_out, job_loss)
            loss_recovered, kept, held_out_accuracy = measured["loss"], True, measured["accuracy"]
        else:
            loss_recovered, kept = recovery.apply_unless_worse_(model, result.masks, loss_pruned)
        seconds = time.perf_counter() - started  # with one pass over the test split
        tried.append(
            Tried(
                allocation=str(allocation),
                model=model,
                macs_fraction=macs(model, data.example) / initial,
                acc_pruned=acc_pruned,
                acc_recovered=accuracy(model, data),
                loss_pruned=loss_pruned,
                loss_recovered=loss_recovered,
                recovery_kept=kept,
                seconds=seconds,
                held_out_accuracy=held_out_accuracy,
            )
        )

    def rank(i: int) -> tuple[float, float, int]:
        accuracy_ = tried[i].held_out_accuracy
        loss = search.judged(tried[i].going_on)
        if accuracy_ is None or not math.isfinite(loss):  # as a job's search ranks them
            return loss, 0.0, i
        return -accuracy_, loss, i

    winner = min(range(len(tried)), key=rank)
    records = [t.record() for t in tried]
    rows = []
    for count, index in sorted({settings.search: winner, 1: 0}.items()):
        chosen = tried[index]
        seconds = sum(t.seconds for t in tried[:count])
        model = copy.deepcopy(chosen.model)
        if settings.search_recovery != "finetune":  # fine-tuned in the search already
            finetune_one_epoch(model, data, seed)
        row = Row(
            search_label(count, settings.search_recovery), data.name, target, seed,
            chosen.macs_fraction, chosen.acc_pruned, accuracy(model, data), acc_dense, seconds,
            chosen.allocation, records[:count],
        )  # fmt: skip
        print(
            f"  {data.name} seed={seed} target={target:.2f} {row.method:<34} "
            f"MACs {row.macs_fraction:.3f}  pruned {row.acc_pruned:.3f}  recovered "
            f"{chosen.acc_recovered:.3f}  fine-tuned {row.acc_finetuned:.3f}  "
            f"({chosen.allocation}; {seconds:.1f}s)",
            flush=True,
        )
        rows.append(row)
    return rows


def _go_on() -> None:
    """A bench search is never cancelled."""


def parse_try(text: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """`layer_floor=0.3,cost_aware=False` -> ("oba, layer_floor=0.3, cost_aware=False", …):
    PruneConfig switches for an extra `oba` row, values read as Python literals."""
    pairs = []
    for item in text.split(","):
        key, _, value = item.partition("=")
        pairs.append((key.strip(), ast.literal_eval(value.strip())))
    return "oba, " + ", ".join(f"{k}={v}" for k, v in pairs), tuple(pairs)


def train_dense(data: Dataset, seed: int, scale: float) -> nn.Module:
    epochs, lr = TRAINING[data.name]
    model = build_model(data.name, seed)
    train_epochs(model, data, max(1, round(epochs * scale)), lr, seed)
    return model


def run(settings: Settings) -> list[Row]:
    register_variants()
    rows: list[Row] = []
    for name in settings.datasets:
        data = load_dataset(name)
        if settings.validation:
            data = split_validation(data, settings.validation)
        for seed in range(settings.first_seed, settings.first_seed + settings.seeds):
            dense = train_dense(data, seed, settings.training_scale)
            print(f"{name} seed={seed}: dense accuracy {accuracy(dense, data):.3f}", flush=True)
            if seed == settings.first_seed and "tp_hessian" in settings.peers:
                sample = (data.x_train[:32], data.y_train[:32])
                broken, fixed = check_hessian_fix(copy.deepcopy(dense), sample)
                print(
                    f"  HessianImportance mean of squared per-sample gradients, relative error: "
                    f"Torch-Pruning's accumulate_grad {broken:.2f}, fixed {fixed:.1e}",
                    flush=True,
                )
            for target in settings.targets:
                rows += run_setting(settings, data, dense, seed, target)
    return rows


# --------------------------------------------------------------------------------------------
# Reporting


def _cells(rows: Sequence[Row]) -> list[str]:
    return [
        f"{statistics.fmean(r.macs_fraction for r in rows):.3f}",
        mean_std([r.acc_pruned for r in rows], 100),
        mean_std([r.acc_finetuned for r in rows], 100),
        mean_std([r.acc_dense for r in rows], 100),
    ]


def tables(rows: Sequence[Row], labels: Sequence[str]) -> str:
    """One markdown table per dataset: rows of `labels`, mean ± std over seeds (accuracy in %)."""
    headers = [
        "method", "dataset", "target", "MACs kept", "acc. pruned (BN recal.)",
        "acc. +1 epoch FT", "dense acc.",
    ]  # fmt: skip
    out = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        body = []
        for target in dict.fromkeys(r.target for r in rows):
            for label in labels:
                group = [
                    r for r in rows if (r.dataset, r.target, r.method) == (dataset, target, label)
                ]
                if group:
                    body.append([label, dataset, f"{target:.2f}", *_cells(group)])
        if body:
            out.append(markdown_table(headers, body))
    return "\n\n".join(out)


def winners(rows: Sequence[Row], label: str) -> str:
    """Which allocation a search row chose, counted over seeds, per cell."""
    body = []
    for dataset, target in dict.fromkeys((r.dataset, r.target) for r in rows):
        chosen = [
            r.chosen for r in rows if (r.dataset, r.target, r.method) == (dataset, target, label)
        ]
        if chosen:
            counts = ", ".join(
                f"{a} ×{chosen.count(a)}" for a in sorted(set(chosen), key=chosen.index)
            )
            body.append([dataset, f"{target:.2f}", counts])
    return markdown_table(["dataset", "target", f"chosen by `{label}` (seeds)"], body)


def paired(rows: Sequence[Row], label: str, against: str, column: str) -> tuple[float, float, int]:
    """Mean difference `label` − `against` in `column` (points) over the seeds both have, in
    one cell's rows, and its standard error (paired by seed: same dense model, same draw)."""
    mine = {r.seed: getattr(r, column) for r in rows if r.method == label}
    theirs = {r.seed: getattr(r, column) for r in rows if r.method == against}
    diffs = [100 * (mine[s] - theirs[s]) for s in sorted(mine.keys() & theirs.keys())]
    if not diffs:
        return math.nan, math.nan, 0
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return statistics.fmean(diffs), se, len(diffs)


def comparisons(rows: Sequence[Row], labels: Sequence[str]) -> str:
    """Each of `labels` against the best peer of its cell and column (by mean; `oba` where no
    peer ran), paired by seed: difference in points ± its standard error (seeds paired)."""
    columns = (("acc_pruned", "pruned"), ("acc_finetuned", "+1 epoch FT"))
    headers = ["row", "dataset", "target"] + [f"{name}: vs best" for _, name in columns]
    body = []
    for dataset, target in dict.fromkeys((r.dataset, r.target) for r in rows):
        cell = [r for r in rows if (r.dataset, r.target) == (dataset, target)]
        present = [p for p in PEERS if any(r.method == p for r in cell)] or ["oba"]
        for label in labels:
            if not any(r.method == label for r in cell):
                continue
            line = [label, dataset, f"{target:.2f}"]
            for column, _ in columns:
                best = max(
                    present,
                    key=lambda p: statistics.fmean(
                        getattr(r, column) for r in cell if r.method == p
                    ),
                )
                diff, se, n = paired(cell, label, best, column)
                line.append(f"{diff:+.2f} ± {se:.2f} vs {best} ({n} seeds)")
            body.append(line)
    return markdown_table(headers, body)


def search_report(rows: Sequence[Row]) -> str:
    labels = sorted(
        {r.method for r in rows if r.method.startswith("oba, search ")},
        key=lambda label: (int(label.split()[2].rstrip(",")), label),
    )
    present = [label for label in ("oba", *PEERS) if any(r.method == label for r in rows)]
    parts = [
        tables(rows, [*present, *labels]),
        comparisons(rows, labels),
        *(winners(rows, label) for label in labels),
    ]
    return "\n\n".join(parts)


def load_rows(paths: Sequence[str]) -> list[Row]:
    """The rows of `--json` files, merged (a row seen twice, same method, cell and seed, once)."""
    merged: dict[tuple[str, str, float, int], Row] = {}
    for path in paths:
        with open(path) as handle:
            for raw in json.load(handle)["rows"]:
                row = Row(**raw)
                merged.setdefault((row.method, row.dataset, row.target, row.seed), row)
    return list(merged.values())


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument(
        "--first-seed", type=int, default=0, metavar="S", help="seeds S..S+N-1 instead"
    )
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS))
    parser.add_argument("--no-ablation", action="store_true", help="skip the oba ablation")
    parser.add_argument("--steps", type=int, default=10, help="re-scored pruning steps")
    parser.add_argument("--schedule", choices=("exponential", "linear"), default="exponential")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--calibration-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="default",
        help="experimental: change the engine's channel score for our rows (see docs)",
    )
    parser.add_argument("--json", help="also write every row to this JSON file")
    parser.add_argument(
        "--try",
        dest="tries",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="an extra oba row with these PruneConfig switches (repeatable)",
    )
    parser.add_argument(
        "--search",
        type=int,
        default=0,
        metavar="K",
        help="add the row `oba, search K` (and `oba, search 1`): K allocations, each recovered "
        "and judged on held-out training rows, the best kept (issue 23)",
    )
    parser.add_argument(
        "--search-recovery",
        choices=("short", "finetune"),
        default="short",
        help="finetune: each candidate gets the epoch and is judged after it by held-out "
        'accuracy, as a job\'s search.recovery "finetune"',
    )
    parser.add_argument(
        "--recovery-rows",
        type=int,
        default=256,
        metavar="N",
        help="calibration rows of each search candidate's recovery (default 256)",
    )
    parser.add_argument(
        "--validation",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="set this fraction of the training rows aside before dense training; the search "
        "judges on them (default 0: on the training rows calibration did not draw)",
    )
    parser.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="run nothing: print the search tables and paired comparisons of these --json files "
        "(merged, so peers from one run pair with a search from another)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, digits, target 0.5, 2 steps, short training",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    settings = Settings(
        seeds=1 if quick else args.seeds,
        first_seed=args.first_seed,
        datasets=("digits",) if quick else tuple(args.datasets),
        targets=(0.5,) if quick else tuple(args.targets),
        methods=tuple(args.methods),
        peers=tuple(args.peers),
        ablation=not args.no_ablation,
        steps=2 if quick else args.steps,
        schedule=args.schedule,
        calibration_batches=2 if quick else args.calibration_batches,
        calibration_size=args.calibration_size,
        training_scale=0.2 if quick else 1.0,
        tolerance=0.05 if quick else 0.0075,
        max_probes=2 if quick else 12,
        variant=args.variant,
        tries=tuple(parse_try(text) for text in args.tries),
        search=args.search,
        recovery_rows=args.recovery_rows,
        search_recovery=args.search_recovery,
        validation=args.validation,
    )
    return settings, args


def main(argv: Sequence[str] | None = None) -> None:
    settings, args = parse_args(argv)
    if args.report:
        print(search_report(load_rows(args.report)))
        return
    set_threads(args.threads)
    started = time.perf_counter()
    rows = run(settings)
    elapsed = time.perf_counter() - started
    labels = [*settings.methods, *settings.peers]
    print("\n## Criteria at equal MACs\n")
    print(tables(rows, labels))
    if settings.ablation:
        print("\n## Ablation of oba's allocation switches\n")
        print(tables(rows, ["oba", *ABLATIONS]))
    if settings.tries:
        print("\n## Switches tried\n")
        print(tables(rows, ["oba", *(label for label, _ in settings.tries)]))
    if settings.search:
        print("\n## A search over allocations, judged after recovery\n")
        print(search_report(rows))
    print(f"\nTotal wall time: {elapsed:.0f} s ({settings})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": asdict(settings), "rows": [asdict(r) for r in rows]}, handle)


if __name__ == "__main__":
    main()
