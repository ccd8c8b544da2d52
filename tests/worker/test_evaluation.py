"""Before/after metrics: accuracy only where the model has classes to compare with the labels."""

from typing import Any

import pytest
import torch
import transformers
from torch import Tensor, nn

from worker.pipeline import evaluation


def config(**extra: Any) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        **extra,
    )


BATCH = {
    "input_ids": torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0)),
    "labels": torch.tensor([0, 1, 1, 0]),
}


def hidden_energy(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    output = model(input_ids=batch["input_ids"])
    state: Tensor = output.last_hidden_state if hasattr(output, "last_hidden_state") else output
    return state.pow(2).mean()


def test_a_model_without_a_head_reports_loss_but_no_accuracy_for_labelled_data() -> None:
    """A sentence embedder distilled on data that happens to carry labels (it crashed)."""
    metrics = evaluation.evaluate(transformers.BertModel(config()), [BATCH], hidden_energy)
    assert set(metrics) == {"loss"} and metrics["loss"] > 0


def test_a_classifier_reports_accuracy() -> None:
    model = transformers.BertForSequenceClassification(config(num_labels=2))

    def cross_entropy(model: nn.Module, batch: dict[str, Any]) -> Tensor:
        logits = model(input_ids=batch["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    passes: list[int] = []
    model.register_forward_hook(lambda *_: passes.append(1))
    metrics = evaluation.evaluate(model, [BATCH, BATCH], cross_entropy)
    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["accuracy"] in {0.0, 0.25, 0.5, 0.75, 1.0}
    assert len(passes) == 2  # the accuracy reads the loss's own forward pass
    with torch.no_grad():
        predictions = model.eval()(input_ids=BATCH["input_ids"]).logits.argmax(-1)
    assert metrics["accuracy"] == (predictions == BATCH["labels"]).float().mean().item()


class _Clock:
    """`time` as `worker.pipeline.evaluation` sees it: it moves only while a `_Clocked` model
    runs, so what the budget counts is the passes' time, not the machine's load."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def perf_counter(self) -> float:
        return self.seconds


class _Clocked(nn.Module):
    """Counts its forward passes; each one takes `seconds` on `clock`."""

    def __init__(self, clock: _Clock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds, self.calls = clock, seconds, 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.clock.seconds += self.seconds
        return x


def test_latency_runs_its_repeats_on_a_fast_model_and_five_once_its_budget_is_spent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock()
    monkeypatch.setattr(evaluation, "time", clock)
    fast, slow = _Clocked(clock, 0.001), _Clocked(clock, 0.02)
    evaluation.latency_ms(fast, {"x": torch.zeros(1)}, repeats=20, budget_s=0.05, warmup=2)
    latency = evaluation.latency_ms(slow, {"x": torch.zeros(1)}, repeats=20, budget_s=0.05)
    assert fast.calls == 2 + 20  # warm-up, then every repeat: 20 ms are within the budget
    assert slow.calls == 1 + 5  # five runs of 20 ms are past the 50 ms budget
    assert latency == pytest.approx(20)
