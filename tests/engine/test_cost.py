"""MAC counts against torch's own FlopCounterMode, per model and per module."""

import contextlib
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from tests.engine import hf_models, models
from tests.engine.test_grouped_attention import FAMILIES
from worker.engine.cost import measure, run_forward

TOKENS = {"input_ids": torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))}
IMAGE = {"pixel_values": torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
CASES: dict[str, tuple[Callable[[], nn.Module], Any]] = {
    "mlp": (models.mlp, torch.randn(2, 6)),
    "residual cnn": (models.ResidualCNN, torch.randn(1, 2, 8, 8)),
    "attention block": (models.AttentionBlock, torch.randn(1, 5, 8)),
    "bert": (hf_models.bert, TOKENS),
    "gpt2 (Conv1D)": (hf_models.gpt2, TOKENS),
    "vit": (hf_models.vit, IMAGE),
    "resnet": (hf_models.resnet, IMAGE),
    "convnext": (hf_models.convnext, IMAGE),
    **{
        family: (partial(hf_models.grouped_query_lm, family), TOKENS | {"use_cache": False})
        for family in FAMILIES
    },
}


def torch_counts(model: nn.Module, inputs: Any) -> tuple[int, dict[str, int]]:
    model.eval()
    # torch lacks the CPU attention kernel's formula; the engine gives it its siblings' one
    cpu_attention = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
            lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v)
        )
    }
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        run_forward(model, inputs)
    by_name = {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops() // 2, by_name


@pytest.mark.parametrize("case", CASES)
def test_macs_match_torch_flop_counter_per_module(case: str) -> None:
    build, inputs = CASES[case]
    torch.manual_seed(0)
    model = build()
    total, by_name = torch_counts(model, inputs)

    cost = measure(model, inputs)

    assert total > 0
    assert cost.macs == total
    prefix = type(model).__name__
    for name, module in model.named_modules():
        assert cost.module_macs[module] == by_name.get(f"{prefix}.{name}" if name else prefix, 0)
    assert cost.params == sum(p.numel() for p in model.parameters())


def test_a_shrunk_layer_counts_less_by_its_own_macs() -> None:
    model = models.mlp(d_in=6, hidden=5, d_out=3)
    before = measure(model, torch.randn(4, 6))
    model[0] = nn.Linear(6, 2)
    model[2] = nn.Linear(2, 5)

    after = measure(model, torch.randn(4, 6))

    assert before.module_macs[model] == 4 * (6 * 5 + 5 * 5 + 5 * 3)
    assert after.macs == 4 * (6 * 2 + 2 * 5 + 5 * 3)
    assert after.module_macs[model[0]] == 4 * 6 * 2


def test_a_failing_forward_leaves_no_hooks_behind() -> None:
    hooks = module_hooks._global_forward_pre_hooks, module_hooks._global_forward_hooks
    before = [len(h) for h in hooks]
    model = models.mlp()
    with pytest.raises(RuntimeError):
        measure(model, torch.randn(2, 7))  # wrong width

    assert [len(h) for h in hooks] == before
    assert model.training  # its mode comes back
    assert measure(model, torch.randn(2, 6)).macs == 2 * (6 * 5 + 5 * 5 + 5 * 3)


def test_inference_mode_counts_the_same() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    image = torch.randn(1, 3, 8, 8)
    expected = 4 * 6 * 6 * 3 * 3 * 3 + 4 * 6 * 6 * 2

    with torch.inference_mode():  # where aten.linear and aten.conv2d reach the counter whole
        assert measure(model, image).macs == expected
    assert measure(model, image).macs == expected


class _Tolerant(nn.Module):
    """Multiplies in its own forward before and after calling a child that raises (and is
    caught); holds one module under two names and one outside its module tree."""

    def __init__(self) -> None:
        super().__init__()
        self.bad = nn.Linear(3, 3)
        self.shared = nn.Linear(4, 4)
        self.again = self.shared
        self.hidden = [nn.Linear(4, 4)]  # a plain list: not a registered child
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight
        with contextlib.suppress(RuntimeError):
            self.bad(x)  # wrong width: raises, and is caught
        return self.hidden[0](self.shared(x)) @ self.weight


def test_per_module_figures_follow_the_calls_made() -> None:
    model = _Tolerant()
    total, by_name = torch_counts(model, torch.randn(2, 4))

    cost = measure(model, torch.randn(2, 4))

    assert cost.macs == total == 4 * 2 * 4 * 4
    assert cost.module_macs[model] == by_name["_Tolerant"] == total  # the hidden layer's too
    assert cost.module_macs[model.bad] == 0  # the product after it is its parent's
    assert cost.module_macs[model.shared] == 2 * 4 * 4  # once, under either name


def test_modules_another_thread_runs_meanwhile_do_not_enter_the_count() -> None:
    entered_ours, entered_other, finish = threading.Event(), threading.Event(), threading.Event()

    class Stall(nn.Module):
        def __init__(self, entered: threading.Event, until: threading.Event) -> None:
            super().__init__()
            self.entered, self.until = entered, until

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.entered.set()
            assert self.until.wait(10)
            return x

    class Counted(nn.Module):  # a product in its own forward, after the other thread entered
        def __init__(self) -> None:
            super().__init__()
            self.stall = Stall(entered_ours, entered_other)
            self.weight = nn.Parameter(torch.randn(6, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stall(x) @ self.weight

    other = nn.Sequential(Stall(entered_other, finish), nn.Linear(6, 7))

    def run_other() -> None:
        assert entered_ours.wait(10)
        with torch.no_grad():
            other(torch.randn(2, 6))

    thread = threading.Thread(target=run_other)
    thread.start()
    counted = Counted()
    try:
        cost = measure(counted, torch.randn(2, 6))  # the other thread is inside `other` now
    finally:
        finish.set()
        thread.join()

    assert cost.macs == 2 * 6 * 5
    assert cost.module_macs[counted] == 2 * 6 * 5


def test_attention_products_count_on_the_cpu_as_on_a_gpu() -> None:
    class Attention(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))  # (batch, heads, tokens, head size)

    # q·kᵀ and the weights times v: batch × heads × tokens × tokens × head size each
    assert measure(Attention(), (q, k, v)).macs == 2 * (1 * 2 * 5 * 5 * 4)
