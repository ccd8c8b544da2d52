"""Scoring a Llama-style model of over 300M parameters on this machine: one pruning step's
scores (OBA, two calibration batches) against one training step on the same two batches, in
time and peak resident memory. Random weights from a `transformers` config (no download);
GQA attention (4 key/value heads for 16 query heads), as in current LLMs.

Each measurement runs in a fresh process (peak RSS is per process); the model is built the
same way in each, so the figures differ only by the work measured.

    .venv/bin/python -m bench.scale --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import torch
import transformers

from worker.engine.scores import parameter_scores

LENGTH, ROWS = 128, 2
CONFIG: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 22,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": LENGTH,
}


def model_and_batches(
    device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    model.to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    vocabulary = CONFIG["vocab_size"]
    batches = [
        {"input_ids": torch.randint(0, vocabulary, (ROWS, LENGTH), generator=generator).to(device)}
        for _ in range(2)
    ]
    return model, batches


def causal_lm(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    loss: torch.Tensor = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    return loss


def training_step(model: torch.nn.Module, batches: list[dict[str, Any]]) -> None:
    """One optimiser step's gradients over the two batches (accumulated)."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        causal_lm(model, batch).backward()


def scoring(model: torch.nn.Module, batches: list[dict[str, Any]]) -> None:
    parameter_scores(model, batches, causal_lm, "oba")


WORK = {"training step": training_step, "scoring (oba)": scoring}


def measure_cuda(name: str, dtype: torch.dtype) -> dict[str, float]:
    """Seconds and peak allocated CUDA memory (weights included) of one run of `name`."""
    model, batches = model_and_batches("cuda", dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    WORK[name](model, batches)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated()
    return {"seconds": seconds, "peak": peak, "before": before, "params": params}


def measure(name: str) -> dict[str, float]:
    """Seconds and peak RSS of one run of `name`, in this process (fresh)."""
    model, batches = model_and_batches()
    resident = _resident_bytes()
    peak = resident
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _resident_bytes())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        WORK[name](model, batches)
    finally:
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    params = sum(p.numel() for p in model.parameters())
    return {"seconds": seconds, "peak": peak, "before": resident, "params": params}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (peak: allocated memory)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--measure", choices=list(WORK), help="internal: one measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        dtype = getattr(torch, args.dtype)
        on_cuda = args.device.startswith("cuda")
        print(json.dumps(measure_cuda(args.measure, dtype) if on_cuda else measure(args.measure)))
        return
    results = {}
    for name in WORK:
        command = [
            sys.executable,
            "-m",
            "bench.scale",
            "--threads",
            str(args.threads),
            "--measure",
            name,
        ]
        command += ["--device", args.device, "--dtype", args.dtype]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
    base = results["training step"]
    params = base["params"]
    print(f"Llama-style, {params / 1e6:.0f}M parameters, {ROWS}×{LENGTH} tokens × 2 batches, "
          f"{args.threads} threads\n")  # fmt: skip
    print("| work | seconds | × training step | peak RSS GiB | × training step | growth GiB |")
    print("|---|---|---|---|---|---|")
    for name, run in results.items():
        growth = (run["peak"] - run["before"]) / 2**30
        print(
            f"| {name} | {run['seconds']:.1f} | {run['seconds'] / base['seconds']:.2f} "
            f"| {run['peak'] / 2**30:.2f} | {run['peak'] / base['peak']:.2f} | {growth:.2f} |"
        )


if __name__ == "__main__":
    main()
