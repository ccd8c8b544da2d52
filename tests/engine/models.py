"""Small hand-written models and data shared by the engine tests."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(d_in: int = 6, hidden: int = 5, d_out: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, d_out),
    )


class ResidualCNN(nn.Module):
    """Conv-BN-ReLU stem, a residual block, a depthwise conv and a linear head."""

    def __init__(self, width: int = 4, classes: int = 3, in_channels: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.expand = nn.Conv2d(width, 2 * width, 1)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = F.relu(self.bn3(self.expand(self.depthwise(x))))
        return self.head(x.mean(dim=(2, 3)))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block (multi-head attention, GELU MLP) with a classifier head."""

    def __init__(self, dim: int = 8, heads: int = 2, hidden: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.num_heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        h = self.norm1(x)
        # (batch, tokens, dim) -> (batch, heads, tokens, head_dim)
        q, k, v = (
            proj(h).view(batch, tokens, self.num_heads, -1).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        attention = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.out((attention @ v).transpose(1, 2).reshape(batch, tokens, -1))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(dim=1))


def randomise_batchnorm_(model: nn.Module, generator: torch.Generator) -> None:
    """Give BatchNorm layers non-trivial affine parameters and running statistics."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = 1 + 0.3 * torch.randn(
                n, generator=generator, dtype=module.weight.dtype
            )
            module.bias.data = 0.2 * torch.randn(n, generator=generator, dtype=module.bias.dtype)
            module.running_mean = 0.1 * torch.randn(
                n, generator=generator, dtype=module.weight.dtype
            )
            module.running_var = 0.5 + torch.rand(n, generator=generator, dtype=module.weight.dtype)


def classification_batches(
    shape: tuple[int, ...], classes: int, count: int, seed: int, dtype: torch.dtype = torch.float32
) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(shape, generator=generator, dtype=dtype),
            torch.randint(0, classes, (shape[0],), generator=generator),
        )
        for _ in range(count)
    ]


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)
