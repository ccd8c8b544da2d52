"""CNNs whose config scales every width by one number (MobileNetV2's `depth_multiplier`,
EfficientNet's `width_coefficient`): the way their smaller variants are made, and the only way
their configs can state pruned widths.

The class rounds each scaled width its own way (`make_divisible`, `round_filters`, floors, a
last layer that does not scale), so the widths of a multiplier are not computed here: the class
is built at that multiplier on the meta device (no memory, no weights) and its layers are read.
Its cost needs no forward pass (on the meta device one took a second): a convolution or linear
layer costs (output positions) × (its weight's elements), and the positions do not change with
the widths, so each layer's MACs scale with its weight; nothing else in these CNNs has any.
Pruning to a goal then means: the largest multiplier (in steps of 1/1000) whose model meets the
goal, and in every group the lowest-scored channels beyond that model's width of the group's
root. What is left is the model the class builds at that multiplier, channel for channel, so the
config written (the multiplier and the fields that state a width outright) rebuilds it exactly.
"""

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from worker.engine.cost import Cost
from worker.engine.families import family_of

GRID = 1000  # multipliers are chosen in steps of 1 / GRID


_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
Switches = frozenset[tuple[str, str, bool]]


def _switches(model: nn.Module) -> Switches:
    """Every module's public boolean attributes (`training` aside), by module name."""
    return frozenset(
        (name, attribute, value)
        for name, module in model.named_modules()
        for attribute, value in vars(module).items()
        if isinstance(value, bool) and attribute != "training" and not attribute.startswith("_")
    )


class MultipliedWidths:
    """The widths and cost of `model`'s class at each multiplier, as the class builds them."""

    def __init__(self, model: nn.Module, cost: Cost, floor: float) -> None:
        """`model` as it comes (the class's own widths), `cost` its cost."""
        config: Any = model.config
        family = family_of(config)
        assert family.width_multiplier is not None
        self._class = type(model)
        self._config = config
        self._field = family.width_multiplier
        self._stated = family.stated_widths
        # each layer's MACs and its weight's elements; what other modules cost stays
        self._layers = {
            name: (cost.module_macs.get(m, 0), m.weight.numel())
            for name, m in model.named_modules()
            if isinstance(m, _LAYERS)
        }
        self._rest = cost.macs - sum(macs for macs, _ in self._layers.values())
        self.current = round(float(getattr(config, self._field)) * GRID)  # in steps
        self._lowest = max(1, math.ceil(floor * self.current))  # the layer floor's multiplier
        self._structure = _switches(model)
        self._built: dict[int, tuple[dict[str, int], dict[str, int], Switches]] = {}

    def widths(self, steps: int) -> dict[str, int]:
        """Output channels of every convolution and linear layer, by module name."""
        return self._at(steps)[0]

    def fit(self, goal: float, metric: str) -> int:
        """The largest multiplier (in steps) no larger than the current one whose model's
        `metric` is at most `goal` and whose modules switch nothing on or off; when none meets
        the goal, the smallest such multiplier above the layer floor's."""
        low, high = self._lowest - 1, self.current  # low: the last step known to meet the goal
        while low < high:
            middle = (low + high + 1) // 2
            if self._at(middle)[1][metric] <= goal:
                low = middle
            else:
                high = middle - 1
        below = range(low, self._lowest - 1, -1)
        above = range(max(low + 1, self._lowest), self.current)
        return next((s for s in (*below, *above) if self._same_structure(s)), self.current)

    def write_(self, model: nn.Module, steps: int) -> dict[str, Any]:
        """Set the multiplier of `steps` (and the widths its family states outright, read from
        the pruned `model`) in the model's config; returns what was written."""
        named = dict(model.named_modules())
        written: dict[str, Any] = {self._field: steps / GRID}
        for field, suffix in self._stated:
            written[field] = _out_channels(_ending(named, suffix))
        for field, value in written.items():
            setattr(model.config, field, value)
        self.current = steps
        return written

    def _same_structure(self, steps: int) -> bool:
        """Whether the class at `steps` switches on what the model as it came does, and only
        that: MobileNetV2 adds a block's residual when rounding makes its input and output
        equally wide, which no removal of channels can give the pruned model."""
        return self._at(steps)[2] == self._structure

    def _at(self, steps: int) -> tuple[dict[str, int], dict[str, int], Switches]:
        """Widths by layer name, the cost ("macs", "params") and the switches of the class at
        `steps`."""
        if steps not in self._built:
            config = copy.deepcopy(self._config)
            setattr(config, self._field, steps / GRID)
            model = self._build(config)
            if self._stated:  # a width the config states outright follows the built layer
                named = dict(model.named_modules())
                for field, suffix in self._stated:
                    setattr(config, field, _out_channels(_ending(named, suffix)))
                model = self._build(config)
            layers = {n: m for n, m in model.named_modules() if isinstance(m, _LAYERS)}
            macs = self._rest + sum(
                macs * layers[name].weight.numel() // elements
                for name, (macs, elements) in self._layers.items()
            )
            params = sum(p.numel() for p in model.parameters())
            widths = {name: _out_channels(m) for name, m in layers.items()}
            self._built[steps] = (widths, {"macs": macs, "params": params}, _switches(model))
        return self._built[steps]

    def _build(self, config: Any) -> nn.Module:
        with torch.device("meta"):
            return self._class(config).eval()


def _ending(named: Mapping[str, nn.Module], suffix: str) -> nn.Module:
    [module] = [m for name, m in named.items() if name.endswith(suffix)]
    return module


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    assert isinstance(module, nn.modules.conv._ConvNd), module
    return module.out_channels
