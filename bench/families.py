"""Every family of the zoo through the job with an `hf` output, on the CPU: how long the job
takes, the MACs it reaches, its reload check's difference, and what the pruning buys in time.

The models and jobs are `tests/worker/family_zoo.py`'s and `tests/worker/family_jobs.py`'s
(tiny, random weights, seeded; the same jobs as `docs/families.md`): each is pruned to half its
MACs, or, where the job refuses half, to the least it says it can reach (rounded up to a
hundredth); a family refused with nothing to prune (its config states no width the job could
move, or it reaches 0.99 or more) gets no timings.

- job s: wall time of the whole job (load, calibration, pruning, export, reload check; the
  second job where the first was refused, the first where that was all); prune s: its pruning
  phase (`result["seconds"]["prune"]`).
- latency: `worker/pipeline/latency.py`'s timer, the median of `--runs` forward passes (eval mode,
  no autograd) after 5 untimed ones, of the dense model and of the `hf` output reloaded with its
  class, on the first 1 and the first 32 rows of the family's data.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.families --threads 2 --runs 20
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import load_file
from torch import nn

from bench.common import markdown_table, set_threads
from tests.worker.family_jobs import TARGET, FamilyJob, macs_reached, reload, run_job
from tests.worker.family_zoo import FAMILIES
from worker.engine import TargetUnreachable
from worker.pipeline.latency import time_forward

BATCHES = (1, 32)
HEADERS = (
    "family",
    "MACs target",
    "job s",
    "prune s",
    "MACs kept",
    "reload diff",
    *(f"batch {rows} ms dense → pruned (×)" for rows in BATCHES),
)


def _job(folder: Path, name: str) -> tuple[FamilyJob, float, float]:
    """The job at half the MACs, or again at what its refusal says it can reach: the job, its
    target and its wall time."""
    target, started = TARGET, time.perf_counter()
    job = run_job(folder / "half", name)
    if isinstance(job.refusal, TargetUnreachable) and job.refusal.reachable < 0.99:
        target = math.ceil(job.refusal.reachable * 100) / 100
        started = time.perf_counter()
        job = run_job(folder / "reachable", name, target)
    return job, target, time.perf_counter() - started


def _latency_ms(model: nn.Module, inputs: dict[str, Any], runs: int) -> float:
    return time_forward(model, inputs, warmup=5, runs=runs).median_ms


def measure_family(name: str, runs: int) -> tuple[str, ...]:
    """One row of the table (see `HEADERS`)."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "half").mkdir()
        (folder / "reachable").mkdir()
        job, target, seconds = _job(folder, name)
        if job.result is None:  # refused with nothing pruned
            return (name, f"{target:g}", f"{seconds:.2f}", "—", macs_reached(job), "—", "—", "—")
        torch.manual_seed(0)  # the weights the job was given
        dense = FAMILIES[name].build().eval()
        pruned = reload(job, folder / "reloaded")
        data = load_file(str(folder / "half" / "data.safetensors"))
        inputs = {rows: {k: v[:rows] for k, v in data.items() if k != "labels"} for rows in BATCHES}
        before = {rows: _latency_ms(dense, inputs[rows], runs) for rows in BATCHES}
        after = {rows: _latency_ms(pruned, inputs[rows], runs) for rows in BATCHES}
        diff = job.result.exports["hf"].relative_diff
        return (
            name,
            f"{target:g}",
            f"{seconds:.2f}",
            f"{job.result.seconds['prune']:.2f}",
            macs_reached(job),
            "0" if diff == 0 else f"{diff:.1e}",
            *(
                f"{before[rows]:.2f} → {after[rows]:.2f} ({after[rows] / before[rows]:.2f})"
                for rows in BATCHES
            ),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="timed forward passes (median)")
    parser.add_argument("--only", nargs="*", default=list(FAMILIES), help="families to run")
    args = parser.parse_args()
    set_threads(args.threads)
    print(f"load average before: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    started = time.perf_counter()
    rows = []
    for name in args.only:
        rows.append(measure_family(name, args.runs))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{time.perf_counter() - started:.0f} s for {len(rows)} families (target {TARGET})")
    print(markdown_table(HEADERS, rows))


if __name__ == "__main__":
    main()
