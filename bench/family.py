"""A family from one job against a single job to its smallest target: time and the members'
numbers. The model is the quickstart's BERT (examples/make_quickstart.py: trained, offline),
pruned to 0.3 of its MACs in one job, and through 0.75, 0.5 and 0.3 in another, on the CPU,
with the same total steps; each run is timed `--repeats` times (median).

    .venv/bin/python -m bench.family --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import set_threads
from service.jobs.results import JobResult, Member
from service.jobs.schemas import JobSpec
from worker.pipeline.steps import JobFiles, execute

_ROOT = Path(__file__).resolve().parents[1]

TARGETS = [0.75, 0.5, 0.3]


def make_quickstart(folder: Path) -> None:
    """examples/make_quickstart.py's model and data (a script, loaded by its path)."""
    found = importlib.util.spec_from_file_location(
        "make_quickstart", _ROOT / "examples" / "make_quickstart.py"
    )
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    module.main(folder)


def spec(targets: list[float], steps: int) -> JobSpec:
    shape: dict[str, Any] = (
        {"targets": [{"macs": t} for t in targets]}
        if len(targets) > 1
        else {"target": {"macs": targets[0]}}
    )
    return JobSpec.model_validate(
        {
            "model_id": "bench",
            "dataset_id": "bench",
            "schedule": {"steps": steps},
            "calibration": {"batches": 4, "batch_size": 32},
            "evaluation": {"fraction": 0.25},
            "outputs": ["hf"],
            **shape,
        }
    )


def quickstart_files(inputs: Path) -> JobFiles:
    """The job's files of `make_quickstart`'s folder."""
    return JobFiles(inputs / "model", "hf", inputs / "data.safetensors", "tensors", None, inputs)


def run(job: JobSpec, files: JobFiles) -> tuple[float, JobResult]:
    """`job` on `files` (its outputs in a folder of its own): wall seconds and its result."""
    with tempfile.TemporaryDirectory() as work:
        files = dataclasses.replace(files, work=Path(work))
        start = time.perf_counter()
        result, _ = execute(job, files, torch.device("cpu"), False, lambda _: None)
        return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder)
        make_quickstart(inputs)
        files = quickstart_files(inputs)
        single = [run(spec([TARGETS[-1]], args.steps), files) for _ in range(args.repeats)]
        family = [run(spec(TARGETS, args.steps), files) for _ in range(args.repeats)]
    single_s = statistics.median(t for t, _ in single)
    family_s = statistics.median(t for t, _ in family)
    print(f"| job | seconds (median of {args.repeats}) | × single |")
    print("|---|---|---|")
    print(f"| one target (macs 0.3) | {single_s:.2f} | 1.00 |")
    print(f"| family (macs 0.75, 0.5, 0.3) | {family_s:.2f} | {family_s / single_s:.2f} |")
    print()
    print("| model | MACs kept | params kept | loss | accuracy | latency ms |")
    print("|---|---|---|---|---|---|")
    result = family[0][1]
    for member in result.members:
        print(_row(f"family: macs {member.target['macs']:g}", member, result))
    alone = single[0][1]
    print(_row("one target: macs 0.3", alone.members[0], alone))


def _row(name: str, model: Member, job: JobResult) -> str:
    after = model.after_pruning
    macs = model.macs_after / job.macs_before
    params = model.params_after / job.params_before
    return (
        f"| {name} | {macs:.3f} | {params:.3f} | {after.loss:.4f} "
        f"| {after.accuracy or 0:.3f} | {after.latency_ms or 0:.3f} |"
    )


if __name__ == "__main__":
    main()
