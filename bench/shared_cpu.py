"""A small job on a shared machine: the quickstart's BERT job (5 pruning steps, `hf` output)
timed alone, then in each of 5 worker-like processes running at once, with torch's default
thread pool (every process takes every core) and with the pool `worker/runtime/threads.py` sizes
(the cores ÷ the workers on the host).

    .venv/bin/python -m bench.shared_cpu --processes 5 --jobs 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def run_jobs(jobs: int, threads: int) -> list[float]:
    """Seconds of each of `jobs` quickstart jobs in this process, with `threads` torch threads."""
    import torch

    from service.jobs.schemas import JobSpec
    from worker.pipeline.steps import JobFiles, execute

    torch.set_num_threads(threads)
    found = importlib.util.spec_from_file_location(
        "make_quickstart", _ROOT / "examples" / "make_quickstart.py"
    )
    assert found is not None and found.loader is not None
    maker = importlib.util.module_from_spec(found)
    found.loader.exec_module(maker)
    seconds = []
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder)
        maker.main(inputs)
        spec = JobSpec.model_validate(
            {"model_id": "b", "dataset_id": "b", "schedule": {"steps": 5}, "outputs": ["hf"]}
        )
        for index in range(jobs):
            work = inputs / f"work{index}"
            work.mkdir()
            files = JobFiles(
                inputs / "model", "hf", inputs / "data.safetensors", "tensors", None, work
            )
            started = time.perf_counter()
            execute(spec, files, torch.device("cpu"), False, lambda _: None)
            seconds.append(time.perf_counter() - started)
    return seconds


def concurrently(processes: int, jobs: int, threads: int) -> list[float]:
    command = [sys.executable, "-m", "bench.shared_cpu", "--child", str(jobs), str(threads)]
    children = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)
    ]
    seconds: list[float] = []
    for child in children:
        output, _ = child.communicate()
        seconds += json.loads(output.strip().splitlines()[-1])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--child", nargs=2, type=int, help="internal: jobs, threads")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_jobs(*args.child)))
        return
    from service.core.settings import Settings
    from worker.runtime.threads import cores, threads_for

    everything = cores()
    sized = threads_for(Settings(workers_per_host=args.processes))
    rows = [
        ("alone, torch's default pool", 1, everything),
        (f"{args.processes} at once, torch's default pool", args.processes, everything),
        (f"{args.processes} at once, the sized pool", args.processes, sized),
    ]
    print(f"{everything} cores; median seconds per job over each process's {args.jobs} jobs\n")
    print("| processes | threads each | median s per job | × alone |")
    print("|---|---|---|---|")
    alone = None
    for name, processes, threads in rows:
        median = statistics.median(concurrently(processes, args.jobs, threads))
        alone = alone or median
        print(f"| {name} | {threads} | {median:.2f} | {median / alone:.1f} |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
