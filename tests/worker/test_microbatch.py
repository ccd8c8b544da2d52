"""Micro-batched calibration: even splits, the same scores, a budget honoured or refused."""

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from tests.worker import factories
from worker.engine import parameter_scores
from worker.pipeline import losses, memory, microbatch
from worker.pipeline.steps import JobFiles, execute


def _loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch["x"]), batch["labels"])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _batch(rows: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(rows, 6, generator=generator, dtype=torch.float64),
        "labels": torch.randint(0, 3, (rows,), generator=generator),
    }


def test_a_batch_splits_into_as_few_and_as_even_micro_batches_as_the_rows_allow() -> None:
    batch: dict[str, Any] = _batch(32) | {"name": "kept as it is"}
    pieces = microbatch.split([batch], 12)
    assert [len(p["labels"]) for p in pieces] == [11, 11, 10]
    assert all(p["name"] == "kept as it is" for p in pieces)
    assert torch.equal(torch.cat([p["x"] for p in pieces]), batch["x"])
    assert microbatch.split([batch], 32) == [batch]


def test_scores_of_micro_batches_are_the_scores_of_the_whole_batch() -> None:
    model, batch = _mlp(), _batch(8)
    whole = parameter_scores(model, [batch], _loss, "oba")
    split = parameter_scores(model, microbatch.split([batch], 4), _loss, "oba")
    for name, score in whole.items():
        torch.testing.assert_close(split[name], score, rtol=1e-10, atol=1e-14)


def test_rows_per_pass_fits_the_budget_and_refuses_one_that_holds_no_row() -> None:
    model, batch = _mlp(), _batch(8)
    per_row = microbatch.saved_bytes_per_row(model, _loss, batch)
    assert per_row > 0
    fixed = memory.scoring_bytes(model)
    five_rows = fixed + 5 * microbatch.ACTIVATION_FACTOR * per_row
    assert microbatch.rows_per_pass(model, _loss, batch, five_rows) == 5
    with pytest.raises(memory.OutOfMemory, match=r"one row needs about [\d.]+ KiB .* may use"):
        microbatch.rows_per_pass(model, _loss, batch, fixed)


def test_a_job_with_little_memory_scores_in_micro_batches_and_one_with_none_fails_early(
    tmp_path: Path,
) -> None:
    model = factories.bert_folder(tmp_path, intermediate=4096)  # weights over a MiB
    data = factories.tensors_file(tmp_path / "data.safetensors")
    files = JobFiles(model, "hf", data, "tensors", None, tmp_path)
    spec = factories.spec(calibration={"batches": 2, "batch_size": 16})
    result, _ = execute(spec, files, torch.device("cpu"), False, lambda _: None)
    assert result.micro_batch_rows == 16  # plenty of memory: whole batches

    # room for the parameter copies and a few rows' activations, not a whole batch
    net = transformers.AutoModelForSequenceClassification.from_pretrained(model).eval()
    batch = {"input_ids": torch.zeros(16, 12, dtype=torch.long), "labels": torch.zeros(16).long()}
    loss = losses.make_loss("cross_entropy", net)
    per_row = microbatch.ACTIVATION_FACTOR * microbatch.saved_bytes_per_row(net, loss, batch)
    tight = memory.scoring_bytes(net) + 4 * per_row
    small = factories.spec(calibration={"batches": 2, "batch_size": 16, "max_memory": tight})
    result, _ = execute(small, files, torch.device("cpu"), False, lambda _: None)
    assert 1 <= result.micro_batch_rows < 16  # the estimate of a batch of zeros is near
    assert result.macs_after <= small.target.value * result.macs_before

    none = factories.spec(calibration={"batches": 2, "batch_size": 16, "max_memory": 2**20})
    with pytest.raises(memory.OutOfMemory, match="scoring even one row"):
        execute(none, files, torch.device("cpu"), False, lambda _: None)


def test_sizes_read_as_people_read_them() -> None:
    assert memory.readable(3 * 2**30 // 2) == "1.5 GiB"
    assert memory.readable(12 * 2**20) == "12 MiB"
    assert memory.readable(100_000) == "97.7 KiB"
    assert memory.readable(512) == "512 B"
