"""A search over allocations on the real sentence embedder (issue 23): all-MiniLM-L6-v2 pruned
label-free (`distill`) to 0.35, 0.5 and 0.65 of its MACs, the search against the engine's default
allocation and the equal-fraction recipe.

The setup is `bench/embedder.py`'s (its calibration batches, MACs example, held-out sentences
and measures: cosine to the original embedding, paraphrase top-1, Spearman), and every model is
pruned as its `engine` rows are (`prune_engine`: heads and FFN neurons, global ranking,
`oba_full`, `--steps` steps). The search is a job's (`worker/pipeline/search.py`): the first K
allocations of `search.allocations` (the default max + exponential first), each recovered with
`search.recover_` (AdamW at the job's default learning rate, the distillation loss, the first
`--recovery-rows` calibration rows) and judged by the distillation loss on the calibration
sentences the job did not draw (`CALIBRATION` after the first `--batches` × 16): never the
held-out sentences the measures use. Rows per target:

- `engine default` and `equal-fraction recipe`: pruned, nothing more (as in `bench.embedder`);
- `search K, chosen`: the chosen candidate right after pruning, and as a job delivers it (after
  its recovery, or as pruned where the recovery raised its held-out loss and was undone);
- `search 1`: the default after the same recovery rule (what the recovery alone gives).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.embedder_search --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from bench.common import markdown_table, set_threads
from bench.embedder import (
    BATCH_SIZE,
    RECIPE_LABEL,
    Row,
    Setup,
    evaluate,
    load_setup,
    prune_engine,
    register_rules,
)
from bench.embedder_sentences import CALIBRATION
from worker.pipeline import datasets, evaluation, losses, models, search


def judging_batches(setup: Setup, batches: int) -> list[dict[str, Any]]:
    """The calibration sentences the job did not draw, as the job's batches."""
    unused = CALIBRATION[batches * BATCH_SIZE :]
    path = setup.work / "judge.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in unused))
    loaded = models.load(setup.folder, "hf", trusted=False)
    columns = datasets.load(path, "jsonl", loaded)
    return datasets.batches(columns, 10_000, BATCH_SIZE, torch.device("cpu"))


def search_rows(
    setup: Setup, target: float, steps: int, candidates: int, recovery_rows: int, batches: int
) -> list[Row]:
    judge = losses.make_loss("distill", setup.dense, setup.pooling)
    first = search.recovery_batches(setup.calibration, recovery_rows)
    cpu = torch.device("cpu")
    held = judging_batches(setup, batches)
    recovery = search.Recovery(first, judge, search.DEFAULT_RECOVERY_LR, held, cpu, lambda: None)
    tried: list[dict[str, Any]] = []
    for allocation in search.allocations(search.Allocation("max", "exponential"), candidates):
        name = str(allocation)
        model, seconds = prune_engine(
            setup, "oba_full", steps, target, allocation.normalisation, allocation.schedule
        )
        pruned = evaluate(setup, "candidate", f"{name}, pruned", model, seconds)
        loss_pruned = evaluation.evaluate(model, held, judge)["loss"]
        delivered = copy.deepcopy(model)
        loss_recovered, kept = recovery.apply_unless_worse_(delivered, {}, loss_pruned)
        state = "recovered" if kept else "recovery undone"
        after = evaluate(setup, "candidate", f"{name}, {state}", delivered.eval(), 0)
        going_on = loss_recovered if kept else loss_pruned
        tried.append({"name": name, "pruned": pruned, "delivered": after, "loss": going_on})
        print(
            f"    held-out distillation loss {loss_pruned:.4f} → {loss_recovered:.4f}", flush=True
        )
    winner = min(range(len(tried)), key=lambda i: (search.judged(tried[i]["loss"]), i))
    chosen = tried[winner]
    label = f"search {candidates}, chosen {chosen['name']}"
    return [
        replace(tried[0]["pruned"], section="engine", label="engine default"),
        replace(chosen["pruned"], section="search", label=f"{label}: right after pruning"),
        replace(chosen["delivered"], section="search", label=f"{label}: as the job delivers it"),
        replace(
            tried[0]["delivered"], section="search", label="search 1 (the default): as delivered"
        ),
        *[t[part] for t in tried for part in ("pruned", "delivered")],
    ]


def run(args: argparse.Namespace, work: Path) -> list[tuple[float, list[Row]]]:
    register_rules()
    setup = load_setup(work, args.batches)
    found = []
    for target in args.targets:
        print(f"target {target}", flush=True)
        recipe, seconds = prune_engine(setup, "oba_full", args.steps, target, RECIPE_LABEL)
        rows = [evaluate(setup, "recipe", "equal-fraction recipe", recipe, seconds)]
        rows += search_rows(
            setup, target, args.steps, args.candidates, args.recovery_rows, args.batches
        )
        found.append((target, rows))
    return found


def report(found: Sequence[tuple[float, Sequence[Row]]]) -> str:
    headers = ["target", "row", "MACs kept", "heads", "FFN", "cosine", "top-1", "Spearman"]
    body = [
        [
            f"{target:g}",
            r.label,
            f"{r.macs_fraction:.3f}",
            str(sum(r.heads)),
            str(sum(r.ffn)),
            f"{r.cosine:.3f}",
            f"{100 * r.retrieval:.1f}%",
            f"{r.spearman:.3f}",
        ]
        for target, rows in found
        for r in rows
        if r.section != "candidate"
    ]
    return markdown_table(headers, body)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.35, 0.5, 0.65])
    # the ranking per MAC saved stays the engine's: the first four candidates only
    parser.add_argument("--candidates", type=int, default=4, choices=range(1, 5))
    parser.add_argument("--recovery-rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--batches", type=int, default=4, help=f"calibration batches of {BATCH_SIZE}"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write every row (candidates too) here")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        found = run(args, Path(work))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                [{"target": t, "rows": [asdict(r) for r in rows]} for t, rows in found], handle
            )
    print(report(found))


if __name__ == "__main__":
    main()
