"""A latency-target job on this machine: prune a BERT until one forward pass of a batch runs
under a target set to `--fraction` of its measured dense time, and report what the job
measured (before, after, noise, speed-up beside the MACs ratio, the rounds).

    .venv/bin/python -m bench.latency_target --threads 2 --batch 32 --fraction 0.6
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from bench.common import set_threads
from service.jobs.schemas import JobSpec
from worker.pipeline import latency
from worker.pipeline.steps import JobFiles, execute

LENGTH = 64


def bert(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=LENGTH,
    )
    config.num_labels = 2
    model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(folder / "model")
    generator = torch.Generator().manual_seed(0)
    data = folder / "data.safetensors"
    save_file(
        {
            "input_ids": torch.randint(0, 1000, (256, LENGTH), generator=generator),
            "labels": torch.randint(0, 2, (256,), generator=generator),
        },
        str(data),
    )
    return folder / "model", data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=0.6)
    args = parser.parse_args()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        model, data = bert(Path(folder))
        dense = transformers.AutoModelForSequenceClassification.from_pretrained(model).eval()
        example = {"input_ids": torch.zeros(1, LENGTH, dtype=torch.long)}
        dense_ms = latency.time_forward(dense, latency.rows_of(example, args.batch)).median_ms
        target = args.fraction * dense_ms
        spec = JobSpec.model_validate(
            {
                "model_id": "bench",
                "dataset_id": "bench",
                "target": {"latency_ms": target, "batch": args.batch},
                "calibration": {"batches": 2, "batch_size": 16},
                "outputs": ["hf"],
            }
        )
        work = Path(folder) / "work"
        work.mkdir()
        files = JobFiles(model, "hf", data, "tensors", None, work)
        result, _ = execute(spec, files, torch.device("cpu"), False, lambda _: None)
    timing = result.latency
    assert timing is not None, "a latency target's job reports its timings"
    print("| batch | target ms | before ms | after ms | noise ms | speed-up | MACs ratio "
          "| latency ratio ÷ MACs ratio | round_to | rounds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratio = (timing.after_ms / timing.before_ms) / timing.macs_ratio
    print(
        f"| {args.batch} | {target:.2f} | {timing.before_ms:.2f} | {timing.after_ms:.2f} "
        f"| {timing.noise_ms:.2f} | {timing.speedup:.2f}× | {timing.macs_ratio:.3f} "
        f"| {ratio:.2f} | {timing.round_to} | {len(timing.rounds)} |"
    )


if __name__ == "__main__":
    main()
