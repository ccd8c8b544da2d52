"""A job's search over candidate allocations (issue 23): one candidate is today's job; more
prune, recover and judge each on held-out rows, and the job goes on with the best."""

import copy
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from service.cli.spec import SpecOptions, build_spec
from service.jobs.results import Candidate, JobResult, Progress
from service.jobs.schemas import JobSpec
from service.jobs.summary import print_candidates
from tests.engine import hf_models
from tests.worker import factories
from worker.engine import PruneResult, TargetUnreachable
from worker.pipeline import evaluation, losses, memory, models, search, steps
from worker.pipeline.inputs import Inputs
from worker.pipeline.steps import JobFiles, execute

CPU = torch.device("cpu")
FFN = "bert.encoder.layer.{}.intermediate.dense"
SURE = torch.tensor([20.0, -20.0])


def _job(tmp_path: Path, **overrides: Any) -> JobSpec:
    """A small BERT job with per-layer widths (safetensors: max and lamp allocate differently),
    one pruning step and a held-out quarter."""
    base = {"outputs": ["safetensors"], "schedule": {"steps": 1}, "evaluation": {"fraction": 0.25}}
    return factories.spec(**(base | overrides))


def _run(
    tmp_path: Path, spec: JobSpec
) -> tuple[JobResult, dict[str, torch.Tensor], list[Progress]]:
    """The job's result, its exported weights and its progress."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    work = tmp_path / "work"
    work.mkdir()
    files = _bert_files(tmp_path, work)
    progress: list[Progress] = []
    result, exports = execute(spec, files, CPU, False, progress.append)
    (exported,) = (e.path for e in exports if e.format == "safetensors")
    with zipfile.ZipFile(exported) as bundle:
        bundle.extractall(tmp_path / "exported")
    return result, load_file(str(tmp_path / "exported" / "model.safetensors")), progress


def _bert_files(tmp_path: Path, work: Path) -> JobFiles:
    """The small BERT and 64 rows of its data, as a job's files."""
    return JobFiles(
        factories.bert_folder(tmp_path),
        "hf",
        factories.tensors_file(tmp_path / "data.safetensors", rows=64),
        "tensors",
        None,
        work,
    )


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobResult, dict[str, torch.Tensor]]:
    """The job without `search` in its spec."""
    tmp_path = tmp_path_factory.mktemp("plain")
    result, weights, _ = _run(tmp_path, _job(tmp_path))
    return result, weights


@pytest.fixture(scope="module")
def searched(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[JobResult, dict[str, torch.Tensor], list[Progress]]:
    """The same job trying three candidates."""
    tmp_path = tmp_path_factory.mktemp("searched")
    return _run(tmp_path, _job(tmp_path, search={"candidates": 3, "recovery_rows": 40}))


def test_one_candidate_is_the_job_as_before(
    tmp_path: Path, plain: tuple[JobResult, dict[str, torch.Tensor]]
) -> None:
    result, weights, progress = _run(tmp_path, _job(tmp_path, search={"candidates": 1}))

    assert result.candidates is None and "candidates" not in result.model_dump()
    assert "search" not in result.seconds
    assert not any(p.stage == "searching" for p in progress)
    assert result.widths == plain[0].widths
    assert result.after_pruning.loss == plain[0].after_pruning.loss
    assert weights.keys() == plain[1].keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, plain[1][name]), name


def test_candidates_are_listed_and_the_best_after_recovery_goes_on(
    searched: tuple[JobResult, dict[str, torch.Tensor], list[Progress]],
    plain: tuple[JobResult, dict[str, torch.Tensor]],
) -> None:
    result, weights, _ = searched
    candidates = result.candidates
    assert candidates is not None
    assert [(c.normalisation, c.schedule) for c in candidates] == [
        ("max", "exponential"),
        ("lamp", "linear"),
        ("lamp", "exponential"),
    ]
    # the job's own candidate is pruned exactly as a job without a search prunes
    assert candidates[0].widths == plain[0].widths
    assert candidates[0].loss_after_pruning == plain[0].after_pruning.loss
    # each was recovered: the same rows move each of them
    assert all(c.loss_after_recovery != c.loss_after_pruning for c in candidates)
    (chosen,) = [c for c in candidates if c.chosen]
    assert chosen.loss_after_recovery == min(c.loss_after_recovery for c in candidates)
    assert chosen.why and chosen.why.startswith("lowest held-out loss after 40 rows of recovery")
    assert all(c.why is None for c in candidates if not c.chosen)
    # the job went on with the chosen model: its widths, sizes and measurement, its files
    assert result.widths == chosen.widths
    assert (result.macs_after, result.params_after) == (chosen.macs, chosen.params)
    assert result.after_pruning.loss == chosen.loss_after_recovery
    for layer in (0, 1):
        assert weights[f"{FFN.format(layer)}.weight"].shape[0] == chosen.widths[FFN.format(layer)]
    assert result.seconds["search"] > 0
    assert "candidates" in result.model_dump(mode="json")


def test_a_search_that_finetunes_each_candidate_keeps_the_most_accurate(tmp_path: Path) -> None:
    spec = _job(
        tmp_path,
        search={"candidates": 3, "recovery": "finetune"},
        finetune={"epochs": 2, "lr": 1e-3},
    )

    result, _, progress = _run(tmp_path, spec)

    candidates = result.candidates
    assert candidates is not None and len(candidates) == 3
    accuracies = [c.accuracy_after_recovery for c in candidates]
    assert all(a is not None for a in accuracies)
    (chosen,) = [c for c in candidates if c.chosen]
    assert chosen is min(
        candidates,
        key=lambda c: (-(c.accuracy_after_recovery or 0.0), c.loss_after_recovery or 0.0),
    )
    assert chosen.why and chosen.why.startswith(
        "highest held-out accuracy after the job's fine-tuning (2 epochs)"
    )
    assert all(c.recovery_kept for c in candidates)  # a fine-tune is never undone
    # the winner was fine-tuned once, in the search: the job's figures are its own
    assert result.after_finetune is not None
    assert result.after_finetune.loss == chosen.loss_after_recovery
    assert result.after_finetune.accuracy == chosen.accuracy_after_recovery
    assert result.after_pruning.loss == chosen.loss_after_pruning
    assert result.after_pruning.latency_ms == result.after_finetune.latency_ms
    assert not any(p.stage == "finetuning" for p in progress)
    # each candidate's fine-tune says its epochs as the search's progress (one that pruned to
    # an earlier one's model, as one pruning step makes both schedules, is not fine-tuned again)
    epochs = [(p.candidate, p.epoch) for p in progress if p.stage == "searching" and p.epoch]
    tuned = [number for number, c in enumerate(candidates, 1) if c.same_as is None]
    assert len(tuned) >= 2
    assert epochs == [(number, epoch) for number in tuned for epoch in (1, 2)]
    percents = [p.percent or 0.0 for p in progress if p.stage == "searching"]
    assert percents == sorted(percents)  # pruning, then the fine-tune, within each share


def test_the_search_reports_each_candidate(
    searched: tuple[JobResult, dict[str, torch.Tensor], list[Progress]],
) -> None:
    progress = [p for p in searched[2] if p.stage == "searching"]
    assert {p.candidates for p in progress} == {3}
    assert sorted({p.candidate for p in progress if p.candidate}) == [1, 2, 3]
    percents = [p.percent or 0 for p in progress]
    assert percents == sorted(percents) and percents[-1] == 100
    # pruning steps inside a candidate come through as the search's, with their sizes
    assert any(p.macs for p in progress)


def test_a_candidate_that_recovers_worse_loses_to_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's own allocation is made to recover badly (its classifier sure of one class
    after its recovery): the other candidate replaces it in everything the job reports and
    writes."""
    recover = search.recover_
    calls: list[nn.Module] = []

    def spoiled_first(net: nn.Module, *args: Any) -> None:
        recover(net, *args)
        if not calls:
            with torch.no_grad():
                net.get_submodule("classifier").bias.copy_(SURE)
        calls.append(net)

    monkeypatch.setattr(search, "recover_", spoiled_first)
    result, weights, _ = _run(tmp_path, _job(tmp_path, search={"candidates": 2}))

    own, other = result.candidates or []
    assert len(calls) == 2 and not own.chosen and other.chosen
    assert own.loss_after_recovery > other.loss_after_recovery
    assert own.recovery_kept is False and other.recovery_kept  # its spoiled recovery undone
    assert own.widths != other.widths  # lamp allocates the FFNs otherwise than max
    assert result.widths == other.widths
    assert result.after_pruning.loss == other.loss_after_recovery
    assert not torch.equal(weights["classifier.bias"], SURE)
    for layer in (0, 1):
        assert weights[f"{FFN.format(layer)}.weight"].shape[0] == other.widths[FFN.format(layer)]


def test_a_recovery_that_raises_the_held_out_loss_is_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every candidate's recovery is spoiled (its classifier sure of one class): each goes on,
    and is judged, as it was right after pruning, and the job writes that model."""
    recover = search.recover_

    def spoiled(net: nn.Module, *args: Any) -> None:
        recover(net, *args)
        with torch.no_grad():
            net.get_submodule("classifier").bias.copy_(SURE)

    monkeypatch.setattr(search, "recover_", spoiled)
    result, weights, _ = _run(tmp_path, _job(tmp_path, search={"candidates": 2}))

    candidates = result.candidates or []
    assert [c.recovery_kept for c in candidates] == [False, False]
    (chosen,) = [c for c in candidates if c.chosen]
    assert chosen.loss_after_pruning == min(c.loss_after_pruning or 0 for c in candidates)
    assert result.after_pruning.loss == chosen.loss_after_pruning
    assert not torch.equal(weights["classifier.bias"], SURE)
    assert chosen.why is not None and "recovery undone" in chosen.why


def _missing(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> None:
    """The measured verdict of the candidates numbered in `calls` (0: the job's own) is a miss."""
    met = steps._target_met
    counted: list[int] = []

    def verdict(*args: Any) -> bool:
        counted.append(len(counted))
        return met(*args) and counted[-1] not in calls

    monkeypatch.setattr(steps, "_target_met", verdict)


def test_a_candidate_that_misses_the_target_drops_out_and_the_search_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _missing(monkeypatch, {0})
    result, _, _ = _run(tmp_path, _job(tmp_path, search={"candidates": 2}))

    own, other = result.candidates or []
    assert own.missed is not None and "target" in own.missed and "\n" not in own.missed
    assert own.loss_after_recovery is None and not own.chosen and own.macs is None
    assert other.chosen and result.widths == other.widths and result.target_met
    assert other.why is not None and other.why.endswith("max + exponential missed the target")


def test_the_job_fails_as_without_a_search_when_every_candidate_misses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _missing(monkeypatch, {0, 1})
    with pytest.raises(TargetUnreachable) as missed:
        _run(tmp_path, _job(tmp_path, search={"candidates": 2}))

    monkeypatch.undo()
    _missing(monkeypatch, {0})  # the first's error, as a job without a search fails
    with pytest.raises(TargetUnreachable) as alone:
        _run(tmp_path / "alone", _job(tmp_path / "alone"))
    assert str(missed.value) == str(alone.value)


def test_the_memory_check_counts_the_copies_a_search_holds() -> None:
    net = nn.Linear(100, 100)
    four, seven = memory.scoring_bytes(net), memory.scoring_bytes(net, 7)
    assert seven == 7 * four // 4

    memory.check_fits(net, CPU, six := seven * 6 // 7)  # one candidate fits
    with pytest.raises(memory.OutOfMemory) as refused:
        memory.check_fits(net, CPU, six, searching=True)
    assert "three more copies a search holds" in str(refused.value)
    assert "search.candidates 1" in str(refused.value)


def test_candidates_start_with_the_jobs_own_allocation() -> None:
    def tried(**overrides: Any) -> list[tuple[str, str]]:
        per_layer = {"evaluation": {"fraction": 0.2}, "outputs": ["safetensors"]}
        spec = factories.spec(**(per_layer | overrides))
        return [(v.normalisation, v.schedule.kind) for v in search.variants(spec)]

    assert tried(search={"candidates": 1}) == [("max", "exponential")]
    assert tried(normalisation="lamp", search={"candidates": 4}) == [
        ("lamp", "exponential"),
        ("lamp", "linear"),
        ("max", "linear"),
        ("max", "exponential"),
    ]
    spec = factories.spec(evaluation={"fraction": 0.2}, search={"candidates": 2})
    assert all(v.method == spec.method and v.target == spec.target for v in search.variants(spec))
    # an hf output's uniform widths: the normaliser changes nothing, only the schedules differ
    assert tried(outputs=["hf"], search={"candidates": 4}) == [
        ("max", "exponential"),
        ("lamp", "linear"),
    ]
    assert tried(outputs=["hf"], normalisation="lamp", search={"candidates": 3}) == [
        ("lamp", "exponential"),
        ("lamp", "linear"),
    ]


def test_the_later_candidates_rank_channels_by_score_alone() -> None:
    def tried(**overrides: Any) -> list[str]:
        return [str(_allocation(v)) for v in search.variants(_variant(**overrides))]

    assert tried(search={"candidates": 8}) == [
        "max + exponential",
        "lamp + linear",
        "lamp + exponential",
        "max + linear",
        "lamp_rank_sum + exponential, not cost-aware",
        "lamp_weights + exponential, not cost-aware",
        "lamp + linear, not cost-aware",
        "lamp + exponential, not cost-aware",
    ]
    # a model without attention heads (a CNN) tries LAMP's widths first, then the same order
    without_heads = search.variants(_variant(search={"candidates": 8}), transformer=False)
    assert [str(_allocation(v)) for v in without_heads] == [
        "max + exponential",
        "lamp_rank_sum + exponential, not cost-aware",
        "lamp_weights + exponential, not cost-aware",
        "lamp + linear",
        "lamp + exponential",
        "max + linear",
        "lamp + linear, not cost-aware",
        "lamp + exponential, not cost-aware",
    ]
    # the spec's own first, wherever it stands in the order
    assert tried(cost_aware=False, search={"candidates": 3}) == [
        "max + exponential, not cost-aware",
        "lamp + linear",
        "lamp + exponential",
    ]
    # uniform widths: neither the normaliser nor the ranking changes a group's fraction
    assert tried(outputs=["hf"], cost_aware=False, search={"candidates": 8}) == [
        "max + exponential, not cost-aware",
        "lamp + linear",
    ]
    record = search._candidate(_variant(cost_aware=False))
    assert record.cost_aware is False
    assert record.allocation == "max + exponential, not cost-aware"
    assert search._candidate(_variant()).model_dump().keys().isdisjoint({"cost_aware"})


def _allocation(spec: JobSpec) -> search.Allocation:
    return search.Allocation(spec.normalisation, spec.schedule.kind, spec.cost_aware)


def _variant(**overrides: Any) -> JobSpec:
    per_layer = {"evaluation": {"fraction": 0.2}, "outputs": ["safetensors"]}
    return factories.spec(**(per_layer | overrides))


def test_a_family_searches_at_each_target_from_the_member_before(tmp_path: Path) -> None:
    spec = _job(
        tmp_path,
        targets=[{"macs": 0.75}, {"macs": 0.5}],
        schedule={"steps": 2},
        search={"candidates": 2, "recovery_rows": 40},
    )

    result, _ = execute(spec, _bert_files(tmp_path, tmp_path), CPU, False, lambda _: None)

    family = result.family or []
    assert len(family) == 2
    for member in family:
        assert member.candidates is not None and len(member.candidates) == 2
        (chosen,) = [c for c in member.candidates if c.chosen]
        assert member.widths == chosen.widths
        assert (member.macs_after, member.params_after) == (chosen.macs, chosen.params)
    first, second = family
    assert second.candidates is not None
    # the second member's candidates are pruned from the first member: never wider
    assert all(c.widths[k] <= first.widths[k] for c in second.candidates for k in c.widths)
    assert result.candidates == second.candidates
    assert [s.step for s in result.steps] == [1, 2]  # one each, numbered across the family
    assert [member for member, _ in result.searches] == ["macs 0.75", "macs 0.5"]
    console = Console(record=True, width=200)
    print_candidates(console, result)
    shown = console.export_text()
    assert "macs 0.75: candidates" in shown and "macs 0.5: candidates" in shown
    assert shown.count("chosen: lowest held-out loss") == 2


def test_where_the_hidden_size_would_be_pruned_uniform_widths_also_try_it_kept() -> None:
    def tried(prunable: bool, **overrides: Any) -> list[tuple[str, bool | None]]:
        spec = factories.spec(evaluation={"fraction": 0.2}, **overrides)
        return [(v.schedule.kind, v.hidden_size) for v in search.variants(spec, prunable)]

    four = {"search": {"candidates": 4}}
    assert tried(True, **four) == [
        ("exponential", None),
        ("linear", None),
        ("exponential", False),
        ("linear", False),
    ]
    assert tried(True, search={"candidates": 3})[2] == ("exponential", False)
    assert tried(False, **four) == [("exponential", None), ("linear", None)]  # nothing to keep
    assert tried(True, hidden_size=True, **four) == [("exponential", True), ("linear", True)]
    # per-layer widths have four pairs to try already
    assert {h for _, h in tried(True, outputs=["safetensors"], **four)} == {None}


def test_a_causal_lm_job_searches_with_its_hidden_size_kept_too(tmp_path: Path) -> None:
    folder, _ = factories.architecture_folder(tmp_path, "llama")
    data = factories.lm_tensors_file(tmp_path / "data.safetensors", rows=48)
    spec = factories.spec(
        loss="causal_lm",
        target={"params": 0.7},
        evaluation={"fraction": 0.25},
        search={"candidates": 4, "recovery_rows": 16},
    )
    files = JobFiles(folder, "hf", data, "tensors", None, tmp_path / "work")
    (tmp_path / "work").mkdir()

    result, _ = execute(spec, files, CPU, False, lambda _: None)

    candidates = result.candidates or []
    assert [(c.schedule, c.hidden_size) for c in candidates] == [
        ("exponential", None),
        ("linear", None),
        ("exponential", False),
        ("linear", False),
    ]
    assert candidates[2].allocation == "max + exponential, hidden size kept"

    def hidden(candidate: Candidate) -> int:  # the hidden size's group is rooted at a down_proj
        widths = candidate.widths.items()
        return next((v for k, v in widths if k.endswith("mlp.down_proj")), 32)

    assert [hidden(c) < 32 for c in candidates] == [True, True, False, False]
    (chosen,) = [c for c in candidates if c.chosen]
    assert result.after_pruning.loss == (
        chosen.loss_after_recovery if chosen.recovery_kept else chosen.loss_after_pruning
    )


def test_a_job_that_removes_blocks_searches_which_and_how_many() -> None:
    def tried(**overrides: Any) -> list[tuple[float, str]]:
        spec = factories.spec(evaluation={"fraction": 0.2}, **overrides)
        return [(v.depth_share, v.block_score) for v in search.variants(spec)]

    both = {"depth_share": 0.5, "search": {"candidates": 4}}
    assert tried(**both) == [(0.5, "loss"), (0.5, "influence"), (0.25, "loss"), (0.25, "influence")]
    assert tried(**both, block_score="influence")[:2] == [(0.5, "influence"), (0.5, "loss")]
    # depth alone: which blocks only
    depth = {"granularity": "layer", "search": {"candidates": 4}}
    assert tried(**depth) == [(0.0, "loss"), (0.0, "influence")]


def test_a_depth_search_lists_the_blocks_each_candidate_removed(tmp_path: Path) -> None:
    spec = _job(
        tmp_path,
        granularity="layer",
        target={"macs": 0.6},
        search={"candidates": 2, "recovery_rows": 40},
    )

    result, weights, _ = _run(tmp_path, spec)

    candidates = result.candidates
    assert candidates is not None
    assert [(c.block_score, c.depth_share) for c in candidates] == [
        ("loss", None),
        ("influence", None),
    ]
    assert all(c.blocks_removed is not None and len(c.blocks_removed) == 1 for c in candidates)
    (chosen,) = [c for c in candidates if c.chosen]
    assert chosen.blocks_removed is not None
    (kept,) = {0, 1} - set(chosen.blocks_removed)
    assert "bert.encoder.layer.0.intermediate.dense.weight" in weights
    assert "bert.encoder.layer.1.intermediate.dense.weight" not in weights
    assert chosen.allocation == f"blocks by {chosen.block_score} (removed {1 - kept})"
    assert chosen.why and chosen.allocation in chosen.why


def test_a_causal_lm_recovers_by_distillation_and_is_judged_by_its_own_loss() -> None:
    net = hf_models.grouped_query_lm("llama", layers=2)
    batches = hf_models.lm_batches(2, 0)
    inputs = Inputs(
        models.LoadedModel(net, None, "text"),
        net,
        torch.float32,
        torch.float32,
        batches,
        batches,
        True,
        losses.causal_lm,
        batches[0],
        4,
        losses.distillation(net),
    )
    spec = factories.spec(loss="causal_lm", evaluation={"fraction": 0.2})
    recover_on = search.recovery_loss(spec, inputs)
    student = copy.deepcopy(net)
    with torch.no_grad():
        assert float(recover_on(student, batches[0])) == 0  # the loaded model is the teacher
        student.model.layers[1].mlp.down_proj.weight.mul_(0.5)
        teacher = nn.functional.log_softmax(net(**batches[0]).logits, -1).flatten(0, 1)
        pupil = nn.functional.log_softmax(student(**batches[0]).logits, -1).flatten(0, 1)
        by_hand = (teacher.exp() * (teacher - pupil)).sum() / teacher.shape[0]
        torch.testing.assert_close(recover_on(student, batches[0]), by_hand)
    # another job recovers on its own loss
    plain = factories.spec(loss="cross_entropy", evaluation={"fraction": 0.2})
    assert search.recovery_loss(plain, inputs) is losses.causal_lm

    recovery = search.Recovery(
        batches, recover_on, 1e-3, batches, CPU, lambda: None, inputs.loss_fn
    )
    after, kept = recovery.apply_unless_worse_(student, {}, float("inf"))
    assert kept and after == evaluation.evaluate(student, batches, losses.causal_lm)["loss"]


def test_the_memory_check_counts_the_teacher_a_distillation_holds() -> None:
    net = nn.Linear(100, 100)
    seven = memory.scoring_bytes(net, 7)
    memory.check_fits(net, CPU, seven, searching=True)
    with pytest.raises(memory.OutOfMemory) as refused:
        memory.check_fits(net, CPU, seven, searching=True, teacher=True)
    assert "the teacher a distillation compares with" in str(refused.value)


def test_recovery_takes_the_first_rows_again_from_the_start_when_short() -> None:
    calibration = [{"input_ids": torch.arange(6).view(3, 2) + 10 * i} for i in range(2)]

    batches = search.recovery_batches(calibration, 8)

    rows = torch.cat([b["input_ids"] for b in batches])
    assert rows.shape == (8, 2)
    assert torch.equal(rows[6:], calibration[0]["input_ids"][:2])
    assert [b["input_ids"].shape[0] for b in search.recovery_batches(calibration, 2)] == [2]


def test_a_tie_goes_to_the_earlier_candidate_and_a_loss_that_is_not_finite_never_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`choose` on a linear model its pruning leaves alone (each candidate the same model) but
    for the candidates whose loss a test sets."""
    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    rows = {"x": torch.randn(8, 4), "labels": torch.randint(0, 2, (8,))}

    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch["x"]), batch["labels"])

    inputs = Inputs(
        models.LoadedModel(net, None, "vision"),
        net,
        torch.float32,
        torch.float32,
        [rows],
        [rows],
        True,
        loss_fn,
        {"x": rows["x"][:1]},
        8,
    )

    def chosen(spoiled: dict[int, float]) -> tuple[int, list[bool]]:
        tried: list[nn.Module] = []

        def prune(variant: JobSpec, copy: nn.Module, report: Any) -> tuple[int, Any, float]:
            if len(tried) in spoiled:
                with torch.no_grad():
                    copy.bias.fill_(spoiled[len(tried)])
            tried.append(copy)
            result = PruneResult(copy, 10, 10, 10, 10, [])
            with torch.no_grad():
                return len(tried) - 1, result, float(loss_fn(copy, rows))

        spec = factories.spec(
            evaluation={"fraction": 0.2}, search={"candidates": 3}, outputs=["safetensors"]
        )
        index, model, records = search.choose(
            spec, inputs, CPU, prune, lambda _: None, lambda: None
        )
        assert model is tried[index]
        return index, [r.chosen for r in records]

    assert chosen({}) == (0, [True, False, False])  # three equal candidates
    # the same model again is judged once: the later ones take the first's figures
    spec = factories.spec(
        evaluation={"fraction": 0.2}, search={"candidates": 3}, outputs=["safetensors"]
    )
    recovered: list[int] = []
    original = search.Recovery.apply_unless_worse_

    def counted(self: search.Recovery, *args: Any) -> tuple[float, bool]:
        recovered.append(1)
        return original(self, *args)

    def untouched(variant: JobSpec, net: nn.Module, report: Any) -> tuple[None, Any, float]:
        with torch.no_grad():
            return None, PruneResult(net, 10, 10, 10, 10, []), float(loss_fn(net, rows))

    monkeypatch.setattr(search.Recovery, "apply_unless_worse_", counted)
    _, _, records = search.choose(spec, inputs, CPU, untouched, lambda _: None, lambda: None)
    assert len(recovered) == 1
    assert [r.same_as for r in records] == [None, 1, 1]
    assert records[1].loss_after_recovery == records[0].loss_after_recovery
    assert records[0].why and records[0].why.endswith(
        "; lamp_rank_sum + exponential, not cost-aware pruned to the model of candidate 1"
        "; lamp_weights + exponential, not cost-aware pruned to the model of candidate 1"
    )  # a linear model has no attention heads: LAMP's widths come first
    assert chosen({0: float("nan")}) == (1, [False, True, False])
    assert chosen({0: float("inf"), 1: float("nan")}) == (2, [False, False, True])


def test_under_distillation_every_candidate_is_judged_against_the_unpruned_model(
    tmp_path: Path,
) -> None:
    result, _, _ = _run(
        tmp_path, _job(tmp_path, loss="distill", search={"candidates": 2, "recovery_rows": 16})
    )

    assert result.before.loss == 0  # the loaded model is the teacher
    candidates = result.candidates or []
    assert len(candidates) == 2
    # a pruned copy is not its own teacher: each is some distance from the loaded model
    assert all((c.loss_after_pruning or 0) > 0 for c in candidates)
    assert all((c.loss_after_recovery or 0) > 0 for c in candidates)
    (chosen,) = [c for c in candidates if c.chosen]
    going_on = chosen.loss_after_recovery if chosen.recovery_kept else chosen.loss_after_pruning
    assert result.after_pruning.loss == going_on


def test_the_command_line_asks_for_a_search_and_is_told_what_it_needs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = {"model_id": "m", "dataset_id": "d"}
    given = SpecOptions(search=3, recovery_rows=128, eval_fraction=0.2)
    assert build_spec(ids, given)["search"] == {"candidates": 3, "recovery_rows": 128}

    with pytest.raises(SystemExit):
        build_spec(ids, SpecOptions(search=2))
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: invalid job spec: spec: Value error, search.candidates > 1")
    assert "set evaluation.fraction" in line
