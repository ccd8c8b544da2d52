"""Where a search's candidates put the channels, beside the peers (issue 23): per-layer widths
of the quality bench's CNN after pruning to a MACs target, for LAMP and Taylor (Torch-Pruning,
matched to the target as `bench.quality` matches them) and for the seven allocations a job's
search tries, with each model's test accuracy after the epoch of fine-tuning every row gets.

The dense models, calibration batches and validation split are `bench.search_judges`'s with
`--validation 0.2`, so a seed's candidates are the ones its `--cells` hold.

`--ignored-layers` keeps those layers whole in every candidate (the engine's `ignored_layers`;
the peers as before): the candidates' allocation of the rest.

    .venv/bin/python -m bench.allocation_widths --dataset mnist1d --target 0.5 --seeds 6
    .venv/bin/python -m bench.allocation_widths --ignored-layers features.0 features.3
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
from collections import defaultdict

from torch import nn

from bench.common import (
    Dataset,
    accuracy,
    calibration_batches,
    cross_entropy,
    finetune_one_epoch,
    load_dataset,
    macs,
    set_threads,
    split_validation,
)
from bench.quality import match_macs, prune_peer, register_variants, train_dense
from bench.search_judges import STEPS, allocation_config
from worker.engine import prune_
from worker.pipeline import search

PEERS = ("tp_lamp", "tp_taylor")
TOLERANCE, MAX_PROBES = 0.0075, 12  # bench.quality's defaults


def widths(model: nn.Module) -> list[int]:
    """Output channels of every convolution and linear layer but the classifier."""
    layers = [m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)]
    return [m.out_channels if isinstance(m, nn.Conv1d | nn.Conv2d) else m.out_features
            for m in layers[:-1]]  # fmt: skip


def finetuned_accuracy(model: nn.Module, data: Dataset, seed: int) -> float:
    model = copy.deepcopy(model)
    finetune_one_epoch(model, data, seed)
    return accuracy(model, data)


def pruned(
    data: Dataset, dense: nn.Module, seed: int, target: float, ignored: tuple[str, ...]
) -> dict[str, nn.Module]:
    """Each peer's model and each candidate's (with the `ignored` layers kept whole), by
    label."""
    batches = calibration_batches(data, seed)
    initial = macs(dense, data.example)
    models = {}
    for peer in PEERS:
        run = functools.partial(prune_peer, peer, dense, data.example, batches, steps=STEPS)
        fraction = lambda m: macs(m, data.example) / initial  # noqa: E731
        models[peer], _, _ = match_macs(run, fraction, target, TOLERANCE, MAX_PROBES)
    for allocation in search.allocations(
        search.Allocation("max", "exponential"), 7, transformer=False
    ):
        model = copy.deepcopy(dense)
        config = allocation_config(allocation, target, seed, ignored)
        prune_(model, data.example, batches, cross_entropy, config)
        models[str(allocation)] = model
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("digits", "mnist1d"), default="mnist1d")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ignored-layers", nargs="+", default=(), metavar="MODULE")
    args = parser.parse_args()
    set_threads(args.threads)
    register_variants()
    data = split_validation(load_dataset(args.dataset), 0.2)
    seen: dict[str, list[tuple[list[int], float]]] = defaultdict(list)
    ignored = tuple(args.ignored_layers)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        dense = train_dense(data, seed, 1.0)
        print(f"seed {seed}: dense widths {widths(dense)}", flush=True)
        for label, model in pruned(data, dense, seed, args.target, ignored).items():
            figures = (widths(model), finetuned_accuracy(model, data, seed))
            seen[label].append(figures)
            print(f"  {label:<36} {figures[0]}  +1 epoch FT {figures[1]:.3f}", flush=True)
    print("\n| model | mean widths per layer | +1 epoch FT, mean % |\n|---|---|---|")
    for label, runs in seen.items():
        layers = zip(*(w for w, _ in runs), strict=True)
        mean = " / ".join(f"{statistics.mean(layer):.1f}" for layer in layers)
        print(f"| {label} | {mean} | {100 * statistics.mean(a for _, a in runs):.2f} |")


if __name__ == "__main__":
    main()
