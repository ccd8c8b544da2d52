"""CPU latency of dense against `oba`-pruned models: does a MACs saving become a time saving?

What is measured: the median wall time of one forward pass (eval mode, `torch.inference_mode`)
over `--runs` timed calls after `--warmup` untimed ones, at batch 1 and batch 32, for

- the benchmark CNNs (`bench/common.py`, trained on `digits` and `mnist1d`) pruned by `oba`
  to 50% and 25% of their MACs (channels removed physically, so the pruned model is a plain
  smaller CNN);
- a small Llama with grouped-query attention (4 layers, 8 query / 2 key-value heads), random
  weights, pruned by `oba` to about 50% of its MACs with uniform widths;
- a small ViT built from a `transformers` config with random weights (no download,
  `HF_HUB_OFFLINE=1`), pruned by `oba` to about 50% of its MACs with `global_ranking=False`
  (the same width in every layer, which a Hugging Face config can describe: the FFN neurons
  shrink; BERT/ViT configs cannot express fewer heads of the same size, so heads stay).

The pruning loss for the ViT is cross-entropy against random labels on random images: latency
does not depend on the values of the weights, only on the shapes pruning leaves.

MACs ratio = pruned / dense MACs of one sample; latency ratio = pruned / dense median time.
Small models at batch 1 are dominated by per-operator overhead, not arithmetic, so their latency
ratio stays well above their MACs ratio; batch 32 shows the arithmetic.

Run `python -m bench.latency --help`.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.common import (
    DATASETS,
    build_model,
    calibration_batches,
    cross_entropy,
    load_dataset,
    markdown_table,
    set_threads,
    train_epochs,
)
from worker.engine import PruneConfig, measure, prune_

Inputs = dict[str, Tensor] | Tensor


@dataclass
class Measurement:
    model: str
    variant: str
    macs: int
    params: int
    median_ms: dict[int, float]  # batch size -> median milliseconds


def _call(model: nn.Module, inputs: Inputs) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


@torch.inference_mode()
def median_latency_ms(model: nn.Module, inputs: Inputs, warmup: int, runs: int) -> float:
    """Median wall milliseconds of `model(inputs)` over `runs` calls after `warmup` calls."""
    model.eval()
    for _ in range(warmup):
        _call(model, inputs)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        _call(model, inputs)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def measure_model(
    name: str,
    variant: str,
    model: nn.Module,
    make_inputs: Callable[[int], Inputs],
    batches: Sequence[int],
    warmup: int,
    runs: int,
) -> Measurement:
    one = make_inputs(1)
    cost = measure(model, one)
    medians = {b: median_latency_ms(model, make_inputs(b), warmup, runs) for b in batches}
    print(
        f"  {name:<12} {variant:<12} MACs {cost.macs / 1e6:8.2f} M  "
        + "  ".join(f"b{b}: {ms:7.3f} ms" for b, ms in medians.items()),
        flush=True,
    )
    return Measurement(name, variant, cost.macs, cost.params, medians)


def cnn_measurements(
    dataset: str, targets: Sequence[float], batches: Sequence[int], warmup: int, runs: int
) -> list[Measurement]:
    """The trained benchmark CNN for `dataset`, dense and pruned by `oba` to each MACs target."""
    data = load_dataset(dataset)
    dense = build_model(dataset, seed=0)
    train_epochs(dense, data, epochs=10, lr=3e-3, seed=0)
    calibration = calibration_batches(data, seed=0)

    def make_inputs(batch: int) -> Tensor:
        return data.x_test[:batch]

    name = f"CNN {dataset}"
    out = [measure_model(name, "dense", dense, make_inputs, batches, warmup, runs)]
    for target in targets:
        model = copy.deepcopy(dense)
        prune_(model, data.example, calibration, cross_entropy, PruneConfig(target=target))
        variant = f"oba {target:.0%} MACs"
        out.append(measure_model(name, variant, model, make_inputs, batches, warmup, runs))
    return out


def dense_and_uniform(
    name: str,
    dense: nn.Module,
    make_inputs: Callable[[int], Inputs],
    calibration: list[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    target: float,
    timing: tuple[Sequence[int], int, int],
) -> list[Measurement]:
    """A Hugging Face model dense and pruned by `oba` with uniform widths (what its config can
    state), each timed at `timing` = (batch sizes, warm-up calls, timed runs)."""
    batches, warmup, runs = timing
    out = [measure_model(name, "dense", dense, make_inputs, batches, warmup, runs)]
    model = copy.deepcopy(dense)
    config = PruneConfig(target=target, global_ranking=False)
    result = prune_(model, make_inputs(1), calibration, loss_fn, config)
    variant = f"oba {target:.0%} MACs"
    out.append(measure_model(name, variant, model, make_inputs, batches, warmup, runs))
    print(f"  {name} config after pruning: {result.config_updates}", flush=True)
    return out


def vit_measurements(
    target: float, batches: Sequence[int], warmup: int, runs: int
) -> list[Measurement]:
    """A 4-layer ViT (hidden 192, 3 heads, FFN 768, 32×32 images in 4×4 patches), uniform widths."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=768,
    )
    config.num_labels = 10
    dense = transformers.ViTForImageClassification(config).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    calibration = [
        {"pixel_values": x, "labels": y}
        for x, y in zip(images.split(16), labels.split(16), strict=True)
    ]

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])

    def make_inputs(batch: int) -> dict[str, Tensor]:
        return {"pixel_values": images[:1].expand(batch, -1, -1, -1).contiguous()}

    timing = (batches, warmup, runs)
    return dense_and_uniform("ViT (HF)", dense, make_inputs, calibration, loss_fn, target, timing)


def llm_measurements(
    target: float, batches: Sequence[int], warmup: int, runs: int
) -> list[Measurement]:
    """A 4-layer Llama with grouped-query attention (hidden 256, 8 query and 2 key/value heads,
    FFN 768, 64 tokens), random weights, pruned by `oba` with uniform widths (what its config
    can state: FFN neurons, key/value groups with their query heads)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    dense = transformers.LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (64, 64), generator=generator)
    calibration = [{"input_ids": chunk} for chunk in tokens.split(16)]

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        ids = batch["input_ids"]
        loss: Tensor = model(input_ids=ids, labels=ids, use_cache=False).loss
        return loss

    def make_inputs(batch: int) -> dict[str, Any]:
        return {"input_ids": tokens[:1].expand(batch, -1).contiguous(), "use_cache": False}

    timing = (batches, warmup, runs)
    return dense_and_uniform(
        "GQA LLM (HF)", dense, make_inputs, calibration, loss_fn, target, timing
    )


def table(measurements: Sequence[Measurement], batches: Sequence[int]) -> str:
    headers = ["model", "variant", "MACs (M)", "MACs ratio", "params (k)"]
    for b in batches:
        headers += [f"batch {b} (ms)", f"latency ratio b{b}"]
    rows = []
    dense: dict[str, Measurement] = {}
    for m in measurements:
        base = dense.setdefault(m.model, m)
        row = [
            m.model,
            m.variant,
            f"{m.macs / 1e6:.2f}",
            f"{m.macs / base.macs:.2f}",
            f"{m.params / 1e3:.1f}",
        ]
        for b in batches:
            row += [f"{m.median_ms[b]:.3f}", f"{m.median_ms[b] / base.median_ms[b]:.2f}"]
        rows.append(row)
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="*", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--vit-target", type=float, default=0.5)
    parser.add_argument("--no-vit", action="store_true")
    parser.add_argument("--llm-target", type=float, default=0.5)
    parser.add_argument("--no-llm", action="store_true")
    parser.add_argument("--no-cnn", action="store_true")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    started = time.perf_counter()
    measurements: list[Measurement] = []
    for dataset in [] if args.no_cnn else args.datasets:
        measurements += cnn_measurements(
            dataset, args.targets, args.batches, args.warmup, args.runs
        )
    if not args.no_vit:
        measurements += vit_measurements(args.vit_target, args.batches, args.warmup, args.runs)
    if not args.no_llm:
        measurements += llm_measurements(args.llm_target, args.batches, args.warmup, args.runs)
    print(f"\n## CPU latency ({args.threads} thread(s), median of {args.runs} runs)\n")
    print(table(measurements, args.batches))
    print(f"\nTotal wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
