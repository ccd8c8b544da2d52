"""A job's search on the tiny GQA LLM (issue 23): width, depth and both at half the
non-embedding parameters, the engine's default, the search and Minitron's recipe, every row then
given the same distillation as `bench/tiny_llm.py`'s rows.

The model, corpus, calibration, target, pruning (`engine_prune`, `oba`, 5 steps, uniform widths)
and distillation are `bench/tiny_llm.py`'s. The candidates are a job's
(`worker/pipeline/search.py`): width tries the two schedules (`search.allocations` under uniform
widths), each with the hidden size pruned and kept; depth tries which blocks go
(`search.depth_plans`: the loss change, then block influence); both tries those with the depth
share and with half of it. Each candidate gets the
search's short recovery (`search.Recovery`: one pass of AdamW at the job's default learning
rate over `--recovery-rows` training windows, KL from the dense model on every next-byte
distribution, as a job's search recovers a causal LM and as Minitron recovers) and is judged,
as a job judges it, by its own loss (next-byte cross-entropy) on `JUDGE_WINDOWS` other training
windows: never the held-out text the perplexity is measured on. Rows per axis:

- `ours: oba` and `Minitron`: pruned, then the distillation (as in `bench.tiny_llm`);
- `ours: oba + recovery` and `Minitron + recovery`: the same models after the same short
  recovery, then the distillation: what the recovery alone gives, so the search is compared
  like for like;
- `ours: search K`: the chosen candidate as a job delivers it (after its recovery, or as pruned
  where the recovery raised its judged loss), then the distillation.

"PPL after prune" is the model as it goes into the distillation (after the recovery on the
recovered rows).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.tiny_llm_search --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM

from bench.common import set_threads
from bench.text_corpus import even_windows, load_corpus, random_windows
from bench.tiny_llm import (
    CACHE,
    DEPTH_SHARE,
    EVAL_WINDOWS,
    JARGON_FILE,
    SEQ,
    Calibration,
    Context,
    Distill,
    Row,
    Training,
    batch_of,
    calibration_batches,
    engine_prune,
    evaluate,
    minitron,
    nonembedding_goal,
    perplexity,
    shape_of,
    table,
    tagged_model,
)
from worker.pipeline import evaluation, search
from worker.pipeline.losses import causal_lm, distillation

JUDGE_WINDOWS = 32
BATCH = 8  # windows per recovery and judging batch
RECOVERY_SEED = 3
JUDGE_SEED = 4
METHOD = "oba"

Pruned = tuple[LlamaForCausalLM, float, str]


def candidates(axis: str, depth_share: float, count: int) -> list[dict[str, Any]]:
    """A job's candidates for the axis, as `engine_prune` keywords, in the order tried."""
    if axis == "width":  # as `search.variants` under uniform widths: the hidden size kept too
        tried = search.allocations(search.Allocation("max", "exponential"), count, uniform=True)
        plain: list[dict[str, Any]] = [{"schedule": a.schedule} for a in tried]
        kept = [{**c, "hidden_size": False} for c in plain]
        return (plain + kept)[:count]
    plans = search.depth_plans(depth_share if axis == "both" else 0.0, "loss", axis == "both")
    return [{"depth_share": share, "block_score": score} for share, score in plans[:count]]


def describe(axis: str, candidate: dict[str, Any]) -> str:
    if axis == "width":
        kept = ", hidden size kept" if candidate.get("hidden_size") is False else ""
        return f"{candidate['schedule']}{kept}"
    share = f", depth share {candidate['depth_share']:g}" if axis == "both" else ""
    return f"blocks by {candidate['block_score']}{share}"


@dataclasses.dataclass
class Judge:
    """The search's short recovery and the rows that judge it."""

    recovery: search.Recovery

    def loss(self, model: torch.nn.Module) -> float:
        judge = self.recovery.judge or self.recovery.loss_fn
        return evaluation.evaluate(model, self.recovery.held_out, judge)["loss"]

    def recovered(self, model: torch.nn.Module) -> tuple[float, float, bool]:
        """Recover `model` unless that raises its judged loss: (before, after, kept)."""
        before = self.loss(model)
        after, kept = self.recovery.apply_unless_worse_(model, {}, before)
        return before, after, kept


def judge_for(ctx: Context, recovery_rows: int) -> Judge:
    generator = torch.Generator().manual_seed(RECOVERY_SEED)
    recovery = random_windows(ctx.corpus.train, recovery_rows, SEQ, generator)
    generator = torch.Generator().manual_seed(JUDGE_SEED)
    judging = random_windows(ctx.corpus.train, JUDGE_WINDOWS, SEQ, generator)
    return Judge(
        search.Recovery(
            [batch_of(chunk) for chunk in recovery.split(BATCH)],
            distillation(ctx.dense),
            search.DEFAULT_RECOVERY_LR,
            [batch_of(chunk) for chunk in judging.split(BATCH)],
            torch.device("cpu"),
            lambda: None,
            causal_lm,
        )
    )


def with_recovery(judge: Judge, run: Callable[[], Pruned]) -> Pruned:
    model, seconds, note = run()
    started = time.perf_counter()
    before, after, kept = judge.recovered(model)
    seconds += time.perf_counter() - started
    told = f"judged loss {before:.4f} -> {after:.4f}" + ("" if kept else " (recovery undone)")
    return model, seconds, "; ".join(filter(None, [note, told]))


def searched(
    ctx: Context, judge: Judge, axis: str, count: int, log: list[dict[str, Any]]
) -> Pruned:
    """The chosen candidate as a job delivers it, the seconds of the whole search, a note."""
    started = time.perf_counter()
    best: tuple[float, LlamaForCausalLM, str] | None = None
    for candidate in candidates(axis, ctx.depth_share, count):
        label = describe(axis, candidate)
        keywords = {"depth_share": ctx.depth_share, **candidate}
        share = keywords.pop("depth_share")
        model, _, note = engine_prune(
            ctx.dense, METHOD, axis, False, ctx.batches, ctx.goal, share, **keywords
        )
        before, after, kept = judge.recovered(model)
        going_on = after if kept else before
        entry = {
            "axis": axis,
            "candidate": label,
            "shape": shape_of(model),
            "judged_after_pruning": before,
            "judged_after_recovery": after,
            "recovery_kept": kept,
            "note": note,
        }
        log.append(entry)
        told = f"loss {before:.4f} -> {after:.4f}"
        print(f"  candidate {label}: {entry['shape']}, {told}", flush=True)
        if best is None or search.judged(going_on) < search.judged(best[0]):
            best = (going_on, model, label)
    assert best is not None
    for entry in log:
        entry["chosen"] = entry["axis"] == axis and entry["candidate"] == best[2]
    return best[1], time.perf_counter() - started, f"chose {best[2]}"


def ours(ctx: Context, axis: str) -> Pruned:
    return engine_prune(ctx.dense, METHOD, axis, False, ctx.batches, ctx.goal, ctx.depth_share)


def theirs(ctx: Context, axis: str) -> Pruned:
    started = time.perf_counter()
    model = minitron(ctx, axis)
    return model, time.perf_counter() - started, ""


def run_rows(
    ctx: Context, judge: Judge, axes: Sequence[str], count: int
) -> tuple[list[Row], list[dict[str, Any]]]:
    rows: list[Row] = []
    log: list[dict[str, Any]] = []
    for axis in axes:
        plain = functools.partial(ours, ctx, axis)
        peer = functools.partial(theirs, ctx, axis)
        runs: list[tuple[str, Callable[[], Pruned]]] = [
            (f"ours: {METHOD}", plain),
            (f"ours: {METHOD} + recovery", functools.partial(with_recovery, judge, plain)),
            (f"ours: search {count}", functools.partial(searched, ctx, judge, axis, count, log)),
            ("Minitron", peer),
            ("Minitron + recovery", functools.partial(with_recovery, judge, peer)),
        ]
        rows += [evaluate(ctx, label, axis, run) for label, run in runs]
    return rows, log


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=JARGON_FILE)
    parser.add_argument("--axes", nargs="+", choices=("width", "depth", "both"), default=None)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--recovery-rows", type=int, default=256, help="windows of 256 bytes")
    parser.add_argument("--depth-share", type=float, default=DEPTH_SHARE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--json", type=Path, help="also write the rows and candidates here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    started = time.perf_counter()
    corpus = load_corpus(args.corpus)
    dense, _ = tagged_model(corpus, Training(), args.cache)
    windows = even_windows(corpus.heldout, EVAL_WINDOWS, SEQ)
    ppl_dense = perplexity(dense, windows)
    ctx = Context(
        dense,
        corpus,
        calibration_batches(corpus, Calibration()),
        windows,
        nonembedding_goal(dense),
        Distill(),
        args.depth_share,
    )
    judge = judge_for(ctx, args.recovery_rows)
    rows, log = run_rows(ctx, judge, args.axes or ("width", "depth", "both"), args.candidates)
    print()
    print(table(rows, ppl_dense))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        record = {
            "ppl_dense": ppl_dense,
            "rows": [dataclasses.asdict(r) for r in rows],
            "candidates": log,
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
