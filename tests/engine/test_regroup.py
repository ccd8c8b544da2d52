"""Groups shrunk after a removal round equal the groups Torch-Pruning traces afresh."""

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.engine import hf_models, models
from worker.engine import PruneConfig, prune_, structured
from worker.engine.groups import ChannelGroup


class Concatenated(nn.Module):
    """Two convolutions concatenated into a third: a removal in the first group shifts the
    positions the second one holds on the third's input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(2, 6, 3, padding=1)
        self.right = nn.Conv2d(2, 4, 3, padding=1)
        self.merge = nn.Conv2d(10, 8, 1)
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.merge(torch.cat([self.left(x), self.right(x)], dim=1)))
        return self.head(x.flatten(1))  # a flatten: each channel is 16 input positions


def _images(count: int, channels: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, channels, 4, 4, generator=generator), torch.randint(0, 3, (4,)))
        for _ in range(count)
    ]


def _hf(name: str) -> tuple[nn.Module, list[Any], Callable[..., Tensor], Any]:
    build, data, loss = hf_models.CASES[name]
    batches = data(2, 0)
    return build(), batches, loss, hf_models.inputs_of(batches[0])


def _plain(model: nn.Module, channels: int) -> tuple[nn.Module, list[Any], Any, Any]:
    batches = _images(2, channels)
    return model, batches, models.cross_entropy, batches[0][0]


CASES: dict[str, Callable[[], tuple[nn.Module, list[Any], Any, Any]]] = {
    **{name: partial(_hf, name) for name in hf_models.CASES},
    "residual cnn": lambda: _plain(models.ResidualCNN(width=8), 2),
    "concatenated": lambda: _plain(Concatenated(), 2),
    "grouped query": lambda: _hf_lm(hf_models.grouped_query_lm("qwen3")),
}


def _hf_lm(model: nn.Module) -> tuple[nn.Module, list[Any], Any, Any]:
    batches = hf_models.lm_batches(2, 0)
    return model, batches, hf_models.causal_lm_loss, hf_models.inputs_of(batches[0])


def _described(groups: list[ChannelGroup]) -> dict[nn.Module, Any]:
    return {
        g.root: (
            g.name,
            g.width,
            g.unit,
            g.handler,
            g.multiple,
            {(id(module), is_out): (idxs, roots) for module, is_out, idxs, roots in g.members},
        )
        for g in groups
    }


@pytest.mark.parametrize("global_ranking", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_shrunk_groups_are_the_groups_traced_afresh(
    case: str, global_ranking: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model, batches, loss, example = CASES[case]()
    original = structured._regrouped
    shrunk_rounds = []

    def checked(groups: list[ChannelGroup], removed: Any, kv: Any, collect: Any) -> Any:
        result = original(groups, removed, kv, collect)
        assert _described(result) == _described(collect())
        shrunk_rounds.append(not any(root in kv for root in removed))
        return result

    monkeypatch.setattr(structured, "_regrouped", checked)
    config = PruneConfig(method="oba", target=0.7, steps=3, global_ranking=global_ranking)
    prune_(model.eval(), example, batches, loss, config)

    assert any(shrunk_rounds)  # the shrinking path ran, not only the fallback
