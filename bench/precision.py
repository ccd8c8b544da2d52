"""Do half-precision OBA scores rank channels as float32 scores do?

For the CIFAR ResNet-20 and the ViT of bench/scoring_cost.py (random weights, eval mode, 4
batches of 32 random images with random labels), it computes `oba` scores with the model and the
data in float32 and again in each half-precision dtype, reduces every Conv/Linear weight's element
scores to channel scores as the engine does (|signed sum over the output channel|), and reports:

- Spearman's rank correlation of all channel scores (each layer's divided by its largest, as the
  engine's global ranking sees them) and its lowest value over single layers;
- the agreement on what would go at 2×: the share of the float32 lower half of channels that
  the half-precision scores also put in the lower half.

On the CPU only bfloat16 is measured (float16 convolutions have no CPU backward kernel); on CUDA
both, with TF32 off for the float32 reference.

    .venv/bin/python -m bench.precision                  # CPU
    .venv/bin/python -m bench.precision --device cuda    # GPU, when there is one
"""

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.scoring_cost import ViT, resnet20
from worker.engine import parameter_scores

MODELS = {"ResNet-20": resnet20, "ViT": ViT}


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    images, labels = batch
    return F.cross_entropy(model(images).float(), labels)


def channel_scores(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], dtype: torch.dtype, device: str
) -> dict[str, Tensor]:
    net = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    moved = [(x.to(device=device, dtype=dtype), y.to(device)) for x, y in batches]
    scores = parameter_scores(net, moved, _loss, "oba")
    return {
        name: scores[f"{name}.weight"].flatten(1).sum(1).abs().double().cpu()
        for name, module in net.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and f"{name}.weight" in scores
    }


def spearman(a: Tensor, b: Tensor) -> float:
    ranks = [v.argsort().argsort().double() for v in (a, b)]
    centred = [r - r.mean() for r in ranks]
    return float((centred[0] * centred[1]).sum() / (centred[0].norm() * centred[1].norm()))


def _normalised(scores: dict[str, Tensor]) -> Tensor:
    return torch.cat([s / s.max() if s.max() > 0 else s for s in scores.values()])


def compare(reference: dict[str, Tensor], half: dict[str, Tensor]) -> tuple[float, float, float]:
    everything = spearman(_normalised(reference), _normalised(half))
    per_layer = min(spearman(reference[k], half[k]) for k in reference if len(reference[k]) > 2)
    a, b = _normalised(reference), _normalised(half)
    count = len(a) // 2
    lower_a, lower_b = set(a.argsort()[:count].tolist()), set(b.argsort()[:count].tolist())
    return everything, per_layer, len(lower_a & lower_b) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    halves = [torch.bfloat16] + ([torch.float16] if args.device.startswith("cuda") else [])
    print(f"device {args.device}\n")
    print("| model | dtype | Spearman, all channels | lowest, one layer | same lower half at 2× |")
    print("|---|---|---|---|---|")
    for name, build in MODELS.items():
        torch.manual_seed(0)
        model = build()
        generator = torch.Generator().manual_seed(1)
        batches = [
            (torch.randn(32, 3, 32, 32, generator=generator), torch.randint(0, 10, (32,)))
            for _ in range(4)
        ]
        reference = channel_scores(model, batches, torch.float32, args.device)
        for dtype in halves:
            everything, layer, lower = compare(
                reference, channel_scores(model, batches, dtype, args.device)
            )
            label = str(dtype).removeprefix("torch.")
            print(f"| {name} | {label} | {everything:.4f} | {layer:.4f} | {lower:.3f} |")


if __name__ == "__main__":
    main()
