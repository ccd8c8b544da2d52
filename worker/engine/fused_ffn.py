"""FFNs whose gate and up projections are one layer (Phi-3's `gate_up_proj`, ModernBERT's `Wi`):
the forward chunks its output in two halves, so neuron j is rows j and I + j of the fused layer
and column j of the down projection — one unit, scored and removed here.

Torch-Pruning's graph sees one layer of 2I output channels feeding a chunk: it cannot couple
row j with row I + j, so these layers stay out of its reach (as grouped-query attention does,
`kv_groups`), and their families name them (`families.Family.fused_ffn`).
"""

from dataclasses import dataclass

from torch import nn

from worker.engine.families import family_of
from worker.engine.groups import ChannelGroup, keep_channels_


@dataclass(frozen=True)
class FusedFfn:
    up: nn.Linear  # gate and up, fused: 2 × width rows
    down: nn.Linear

    @property
    def width(self) -> int:
        return self.up.out_features // 2

    def channel_group(self, name: str) -> ChannelGroup:
        """Neuron j as root channel j: rows j and width + j of `up`, column j of `down`."""
        width = self.width
        rows = list(range(2 * width))
        columns = list(range(width))
        members: list[tuple[nn.Module, bool, list[int], list[int]]] = [
            (self.up, True, rows, [r % width for r in rows]),
            (self.down, False, columns, columns),
        ]
        return ChannelGroup(name, self.up, None, width, 1, members)

    def remove_(self, neurons: list[int]) -> None:
        """Remove neurons (indices among the current ones) from both halves and the down
        projection."""
        drop = set(neurons)
        kept = [j for j in range(self.width) if j not in drop]
        keep_channels_(self.up, 0, kept + [self.width + j for j in kept])
        keep_channels_(self.down, 1, kept)


def fused_ffn_layers(model: nn.Module) -> list[FusedFfn]:
    """The fused FFNs of `model`, as its family names them ((fused up, down) module names)."""
    names = family_of(getattr(model, "config", None)).fused_ffn
    if not names:
        return []
    found = []
    for parent in model.modules():
        for up_name, down_name in names:
            up, down = getattr(parent, up_name, None), getattr(parent, down_name, None)
            if (
                isinstance(up, nn.Linear)
                and isinstance(down, nn.Linear)
                and up.out_features == 2 * down.in_features
            ):
                found.append(FusedFfn(up, down))
    return found
