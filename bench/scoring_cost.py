"""Cost of each scoring method relative to one training step (forward + `loss.backward()`).

For ResNet-style CNNs (CIFAR ResNet-18 and ResNet-20: 32×32 input, BatchNorm, residual blocks)
and a ViT-style model (patch convolution, LayerNorm, multi-head attention, GELU MLP; patch 4,
dim 192, 6 blocks, 3 heads), all with random weights in eval mode and a batch of 32, it reports
per method of `worker.engine.METHODS` the time and the peak memory of `parameter_scores` on that
one batch, each as a ratio to one forward + backward on the same batch. Two reference rows score
`oba_full` and `oba` with the plain double-backward (`hvp` with v = θ, no θ shortcut), to show
what it saves.

Time: one process per model runs every measurement once per round, interleaved over `--repeats`
rounds after a warm-up round, and reports medians, so that load from other processes hits all
measurements alike.

Peak memory: every measurement runs in a fresh subprocess that builds the model and the batch,
runs the measurement once to warm up, then reads its resident set size (RSS, /proc/self/statm)
and runs it again while a thread samples the RSS every 0.2 ms; the highest sample minus the
starting RSS is that measurement's peak working memory (activations, graphs, gradients, scores).
Sampling, not `ru_maxrss`: the latter is a high-water mark that imports and set-up may already
have raised above what a measurement needs. The subprocess runs with glibc's
MALLOC_MMAP_THRESHOLD_=65536, so that every tensor above 64 KiB is mmap-ed and unmapped when freed
and RSS follows the live tensors (glibc's default threshold adapts upwards and then keeps freed
blocks resident); a peak shorter than the sampling interval could be missed.

    python -m bench.scoring_cost --repeats 5 --threads 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.engine import METHODS, parameter_scores
from worker.engine.hvp import hvp
from worker.engine.scores import linearised_loss

Batch = tuple[Tensor, Tensor]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet(widths: tuple[int, ...], blocks: int, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for block in range(blocks):
            layers.append(BasicBlock(cin, cout, 2 if block == 0 and stage > 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def resnet18() -> nn.Module:
    """CIFAR ResNet-18: four stages of two basic blocks (64, 128, 256, 512 channels)."""
    return _resnet((64, 128, 256, 512), blocks=2)


def resnet20() -> nn.Module:
    """CIFAR ResNet-20: three stages of three basic blocks (16, 32, 64 channels). Its 32 ms
    training step makes per-layer overheads weigh most: the hardest case for the ratios."""
    return _resnet((16, 32, 64), blocks=3)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        # (batch, tokens, 3 dim) -> 3 × (batch, heads, tokens, head_dim)
        q, k, v = (
            self.qkv(x).reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        )
        attention = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        # (batch, heads, tokens, head_dim) -> (batch, tokens, dim)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, dim: int = 192, depth: int = 6, heads: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.position = nn.Parameter(0.02 * torch.randn(1, 64, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        # (batch, dim, 8, 8) -> (batch, 64 tokens, dim)
        x = self.patch(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": resnet18,
    "resnet20": resnet20,
    "vit": ViT,
}
REFERENCES = ("oba_full (plain double-backward)", "oba (plain double-backward)")
BASELINE = "forward + backward"


def cross_entropy(model: nn.Module, batch: Batch) -> Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def setup(name: str, batch_size: int, device: str = "cpu") -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)
    model = MODELS[name]().eval().to(device)
    batch = (torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,)))
    return model, (batch[0].to(device), batch[1].to(device))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measurement(name: str, model: nn.Module, batch: Batch) -> Callable[[], object]:
    """The work to time or measure, by name: the baseline, a method, or a reference."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == BASELINE:

        def step() -> None:
            model.zero_grad(set_to_none=True)
            cross_entropy(model, batch).backward()

        return step
    if name in REFERENCES:
        objective = (
            (lambda: cross_entropy(model, batch))
            if name.startswith("oba_full")
            else (lambda: linearised_loss(model, batch, cross_entropy))
        )
        return lambda: [
            p.detach() * h for p, h in zip(params, hvp(objective, params, params), strict=True)
        ]
    return lambda: parameter_scores(model, [batch], cross_entropy, name)


def time_all(
    model_name: str, names: list[str], repeats: int, batch_size: int, device: str = "cpu"
) -> dict[str, float]:
    """Median seconds per measurement over interleaved rounds (after one warm-up round)."""
    model, batch = setup(model_name, batch_size, device)
    runs = {name: measurement(name, model, batch) for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if round_ > 0:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(model_name: str, name: str, batch_size: int, device: str = "cpu") -> int:
    """Peak RSS growth in bytes of one measurement, in this (fresh) process; on CUDA the peak
    of memory allocated by torch over what was allocated before."""
    model, batch = setup(model_name, batch_size, device)
    run = measurement(name, model, batch)
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    before = resident_bytes()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_bytes())
            time.sleep(2e-4)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return peak - before


def peak_memory_in_subprocess(model_name: str, name: str, args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "bench.scoring_cost", "--memory-of", model_name, name]
    command += ["--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    command += ["--device", args.device]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    output = subprocess.run(
        command, check=True, capture_output=True, text=True, env=environment
    ).stdout
    return int(json.loads(output.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (TF32 off)")
    parser.add_argument("--memory-of", nargs=2, metavar=("MODEL", "MEASUREMENT"), help="internal")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    if args.memory_of:
        model_name, name = args.memory_of
        print(json.dumps(peak_memory(model_name, name, args.batch_size, args.device)))
        return

    names = [BASELINE, *METHODS, *REFERENCES]
    print(
        f"batch {args.batch_size}, {args.device}, {args.threads} threads, "
        f"median of {args.repeats} rounds\n"
    )
    print("| model | method | time (× fwd+bwd) | peak memory (× fwd+bwd) |")
    print("|---|---|---|---|")
    for model_name in args.models:
        seconds = time_all(model_name, names, args.repeats, args.batch_size, args.device)
        memory = {name: peak_memory_in_subprocess(model_name, name, args) for name in names}
        base_s, base_b = seconds[BASELINE], memory[BASELINE]
        print(f"| {model_name} | {BASELINE} | {base_s * 1e3:.0f} ms | {base_b / 2**20:.0f} MiB |")
        for name in names[1:]:
            print(
                f"| {model_name} | {name} | {seconds[name] / base_s:.2f} |"
                f" {memory[name] / base_b:.2f} |"
            )


if __name__ == "__main__":
    main()
