"""Which judge of a search picks the candidate that does best after fine-tuning (issue 23).

For each cell of `bench.quality` (dataset, seed, target; the same dense models, calibration
draws and held-out rows) the four candidates of a job's search (`search.allocations`: max +
exponential, lamp + linear, lamp + exponential, max + linear) are pruned once, as the quality
bench's `oba` row prunes. Each then gets every recovery variant (AdamW over the first N
calibration rows at a learning rate, `search.recover_`), is measured on the held-out rows, and
gets the epoch of fine-tuning every quality row gets. A judge picks one candidate per cell:

- `after recovery`: the lowest held-out loss after recovery (what a job does today);
- `after pruning`: the lowest held-out loss right after pruning (no recovery needed to judge);
- `both`: the lowest mean of the two;
- `accuracy`: the highest held-out accuracy after recovery (ties: the lower loss);
- `accuracy within noise`: of the candidates whose held-out accuracy is within one binomial
  standard error of the best's, the lowest held-out loss (accuracy on a few hundred rows moves
  by a row or two between candidates that are as good; the loss sees every row's margin);
- `own unless beaten`: the spec's own allocation, unless another's held-out accuracy is ahead
  by more than one standard error of the difference (the highest such; ties: the lower loss).

The variant `the epoch` is no short recovery: each candidate gets the epoch of fine-tuning every
quality row gets and is judged after it, so its fine-tuned accuracy is after that one epoch (a
search that fine-tunes every candidate and keeps the best, K times the fine-tuning).
`--validation FRACTION` sets the rows aside as `bench.quality --validation` does (the same dense
models as its run of that fraction); the judges then measure on them.

The rows it writes (`--json`) are `bench.quality` rows, one per variant and judge, labelled
`judge <variant>, <judge>`, plus `oracle <variant>`: the candidate with the best test accuracy
after its epoch, which no judge can pass, and `candidate <variant>: <allocation>`: that
candidate in every cell, as a job without a search (`search.candidates` 1) would prune it.
`--report` pairs them by seed with the peers of `bench.quality --json` files and prints the
differences from the best peer of every cell.
`--cells` keeps every candidate's figures; `--from-cells` judges such files again without
pruning anything (so a judge added later is measured on the same candidates), all of their
candidates or the first `--candidates`, less any `--leave-out`.

    .venv/bin/python -m bench.search_judges --seeds 10 --threads 1 --json judges.json
    .venv/bin/python -m bench.search_judges --from-cells cells.json --json judges.json
    .venv/bin/python -m bench.search_judges --report judges.json \
        docs/benchmarks/data/quality-peers-digits.json \
        docs/benchmarks/data/quality-peers-mnist1d.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from bench.common import (
    Dataset,
    accuracy,
    calibration_batches,
    cross_entropy,
    finetune_one_epoch,
    held_out_batch,
    load_dataset,
    macs,
    set_threads,
    split_validation,
)
from bench.quality import (
    Row,
    as_job_batch,
    comparisons,
    job_loss,
    load_rows,
    register_variants,
    train_dense,
    variant_config,
)
from worker.engine import PruneConfig, prune_
from worker.pipeline import evaluation, search

# (learning rate, rows): the job's default recovery first; None: the fine-tuning epoch itself
VARIANTS: dict[str, tuple[float, int] | None] = {
    "lr 1e-3, 256 rows": (1e-3, 256), "lr 3e-4, 256 rows": (3e-4, 256),
    "lr 1e-4, 256 rows": (1e-4, 256), "lr 1e-3, 512 rows": (1e-3, 512), "the epoch": None,
}  # fmt: skip
JUDGES = (
    "after recovery", "after pruning", "both", "accuracy", "accuracy within noise",
    "own unless beaten",
)  # fmt: skip
STEPS = 10


def _judged(candidate: dict[str, Any], variant: str, judge: str) -> tuple[float, float]:
    """What `judge` ranks a candidate by, lowest first (ties broken by the second figure)."""
    before, after = candidate["loss_pruned"], candidate["recovered"][variant]["loss"]
    if judge == "accuracy":
        return -candidate["recovered"][variant]["held_out_accuracy"], search.judged(after)
    loss = {"after recovery": after, "after pruning": before, "both": (before + after) / 2}[judge]
    return search.judged(loss), 0.0


def _standard_error(accuracy: float, rows: int) -> float:
    return math.sqrt(max(accuracy * (1 - accuracy), 1 / rows) / rows)


def pick(cell: list[dict[str, Any]], variant: str, judge: str, rows: int) -> int:
    """The candidate `judge` keeps (index into `cell`, the spec's own first)."""
    if judge not in ("accuracy within noise", "own unless beaten"):
        return min(range(len(cell)), key=lambda i: (*_judged(cell[i], variant, judge), i))
    figures = [c["recovered"][variant] for c in cell]
    accuracies = [f["held_out_accuracy"] for f in figures]
    if judge == "accuracy within noise":
        best = max(accuracies)
        near = [i for i in range(len(cell)) if best - accuracies[i] <= _standard_error(best, rows)]
        return min(near, key=lambda i: (search.judged(figures[i]["loss"]), i))
    own = accuracies[0]
    ahead = [
        i for i in range(1, len(cell))
        if accuracies[i] - own > math.sqrt(2) * _standard_error(accuracies[i], rows)
    ]  # fmt: skip
    return min(ahead or [0], key=lambda i: (-accuracies[i], search.judged(figures[i]["loss"]), i))


@torch.no_grad()
def held_out_accuracy(model: nn.Module, held_out: dict[str, Any]) -> float:
    model.eval()
    return float((model(held_out["x"]).argmax(1) == held_out["labels"]).float().mean())


def allocation_config(
    allocation: search.Allocation, target: float, seed: int, ignored: tuple[str, ...] = ()
) -> PruneConfig:
    """How `bench.quality`'s `oba` row prunes, under one of a search's allocations (the
    `ignored` layers kept whole)."""
    switches = variant_config(
        "default", "oba",
        {"normalisation": allocation.normalisation, "cost_aware": allocation.cost_aware},
    )  # fmt: skip
    return PruneConfig(
        target_metric="macs", target=target, steps=STEPS, schedule=allocation.schedule,  # type: ignore[arg-type]
        seed=seed, ignored_layers=ignored, **switches,
    )  # fmt: skip


def candidates(
    data: Dataset, dense: nn.Module, seed: int, target: float, count: int, variants: Sequence[str]
) -> list[dict[str, Any]]:
    """The first `count` candidates of a search in one cell: each pruned once, then each
    recovery variant."""
    batches = calibration_batches(data, seed)
    held_out = [as_job_batch(held_out_batch(data, seed))]
    initial = macs(dense, data.example)
    found = []
    for allocation in search.allocations(
        search.Allocation("max", "exponential"), count, transformer=False
    ):
        model = copy.deepcopy(dense)
        config = allocation_config(allocation, target, seed)
        masks = prune_(model, data.example, batches, cross_entropy, config).masks
        candidate: dict[str, Any] = {
            "allocation": str(allocation),
            "macs_fraction": macs(model, data.example) / initial,
            "acc_pruned": accuracy(model, data),
            "loss_pruned": evaluation.evaluate(model, held_out, job_loss)["loss"],
            "recovered": {},
        }
        for variant in variants:
            recovered = copy.deepcopy(model)
            recovery = VARIANTS[variant]
            if recovery is None:
                finetune_one_epoch(recovered, data, seed)
            else:
                lr, rows = recovery
                first = search.recovery_batches([as_job_batch(b) for b in batches], rows)
                search.recover_(
                    recovered, first, job_loss, lr, masks, torch.device("cpu"), lambda *_: None
                )
            loss = evaluation.evaluate(recovered, held_out, job_loss)["loss"]
            held_out_acc = held_out_accuracy(recovered, held_out[0])
            if recovery is not None:
                finetune_one_epoch(recovered, data, seed)
            candidate["recovered"][variant] = {
                "loss": loss,
                "held_out_accuracy": held_out_acc,
                "acc_finetuned": accuracy(recovered, data),
            }
        found.append(candidate)
    return found


def rows_of(
    cell: list[dict[str, Any]], dataset: str, seed: int, target: float, dense: float, held_out: int
) -> list[Row]:
    """One row per variant and judge, per variant the oracle's and each candidate's as a job
    without a search would give it (`held_out`: the rows the judges measure on)."""
    rows = []
    for variant in cell[0]["recovered"]:
        picks = {
            f"judge {variant}, {judge}": pick(cell, variant, judge, held_out) for judge in JUDGES
        }
        picks[f"oracle {variant}"] = max(
            range(len(cell)), key=lambda i: cell[i]["recovered"][variant]["acc_finetuned"]
        )
        picks |= {f"candidate {variant}: {c['allocation']}": i for i, c in enumerate(cell)}
        for label, index in picks.items():
            chosen = cell[index]
            finetuned = chosen["recovered"][variant]["acc_finetuned"]
            row = Row(label, dataset, target, seed, chosen["macs_fraction"], chosen["acc_pruned"],
                      finetuned, dense, 0.0, chosen["allocation"])  # fmt: skip
            rows.append(row)
    return rows


def run(
    seeds: range,
    datasets: Sequence[str],
    targets: Sequence[float],
    count: int,
    variants: Sequence[str],
    validation: float,
) -> list[dict[str, Any]]:
    """Every cell's candidates, with what `rows_of` needs besides."""
    register_variants()
    cells: list[dict[str, Any]] = []
    for name in datasets:
        data = load_dataset(name)
        if validation:
            data = split_validation(data, validation)
        held_out = int(held_out_batch(data, 0)[1].shape[0])
        for seed in seeds:
            dense = train_dense(data, seed, 1.0)
            for target in targets:
                cell = {
                    "dataset": name, "seed": seed, "target": target,
                    "acc_dense": accuracy(dense, data), "held_out": held_out,
                    "candidates": candidates(data, dense, seed, target, count, variants),
                }  # fmt: skip
                cells.append(cell)
                print(f"{name} seed={seed} target={target:.2f}: {json.dumps(cell)}", flush=True)
    return cells


def judge_cells(cells: Sequence[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    for c in cells:
        rows += rows_of(
            c["candidates"], c["dataset"], c["seed"], c["target"], c["acc_dense"], c["held_out"]
        )
    return rows


def report(rows: Sequence[Row]) -> str:
    labels = [f"judge {v}, {j}" for v in VARIANTS for j in JUDGES]
    labels += [f"oracle {v}" for v in VARIANTS]
    labels += list(dict.fromkeys(r.method for r in rows if r.method.startswith("candidate ")))
    return comparisons(rows, labels)


def _narrowed(cell: dict[str, Any], count: int | None, left_out: Sequence[str]) -> dict[str, Any]:
    """The cell with only its first `count` candidates (all: None), less those `left_out`."""
    kept = cell["candidates"][:count]
    return cell | {"candidates": [c for c in kept if c["allocation"] not in left_out]}


def _load(path: str) -> list[dict[str, Any]]:
    with open(path) as handle:
        cells: list[dict[str, Any]] = json.load(handle)["cells"]
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds", type=int, default=None,
        help="run seeds S..S+N-1 (default 3); with --report or --from-cells, only those",
    )  # fmt: skip
    parser.add_argument("--first-seed", type=int, default=0, help="seeds S..S+N-1 (default 0)")
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--candidates",
        type=int,
        default=None,
        choices=range(1, 9),
        help="the first K of a job's search (default 4; with --from-cells, every one there)",
    )
    parser.add_argument(
        "--leave-out", nargs="+", default=(), metavar="ALLOCATION",
        help="with --from-cells: judge without these candidates ('lamp + linear', …)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="the recoveries to try (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--validation", type=float, default=0.0, metavar="FRACTION",
        help="set this fraction of the training rows aside; the judges measure on them",
    )  # fmt: skip
    parser.add_argument("--json", help="write the rows here (bench.quality's format)")
    parser.add_argument("--cells", help="write every candidate's figures here")
    parser.add_argument(
        "--from-cells", nargs="+", metavar="JSON",
        help="prune nothing: judge the candidates of these --cells files again",
    )  # fmt: skip
    parser.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="run nothing: pair these rows (this bench's and bench.quality's) and print them",
    )
    args = parser.parse_args()
    seeds = range(args.first_seed, args.first_seed + (args.seeds or 3))
    if args.report:
        rows = load_rows(args.report)
        print(report([r for r in rows if args.seeds is None or r.seed in seeds]))
        return
    if args.from_cells:
        cells = [c for path in args.from_cells for c in _load(path)]
        cells = [c for c in cells if args.seeds is None or c["seed"] in seeds]
        cells = [_narrowed(c, args.candidates, args.leave_out) for c in cells]
    else:
        set_threads(args.threads)
        cells = run(
            seeds,
            args.datasets,
            args.targets,
            args.candidates or 4,
            args.variants,
            args.validation,
        )
        if args.cells:
            with open(args.cells, "w") as handle:
                json.dump({"cells": cells}, handle)
    rows = judge_cells(cells)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": [asdict(r) for r in rows]}, handle)
    # the peers come from bench.quality's own runs (minutes each), paired here by seed
    print(f"{len(rows)} rows; pair them with peers: --report {args.json or 'JSON'} PEERS.json …")


if __name__ == "__main__":
    main()
