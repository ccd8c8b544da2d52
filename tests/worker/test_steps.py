"""Whole jobs through worker.pipeline.steps.execute: every data format and output format,
metrics."""

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
import transformers
from safetensors.torch import load_file

from service.cli.spec import SpecOptions, build_spec
from service.jobs.results import JobResult, Progress
from service.jobs.schemas import JobSpec
from tests.worker import factories
from worker.engine import EngineError, measure
from worker.engine.plan import Plan, apply_plan_
from worker.pipeline import datasets, evaluation, models
from worker.pipeline.steps import JobFailed, JobFiles, execute, prune_config, steps_per_goal

CPU = torch.device("cpu")


def _run(
    spec: JobSpec,
    model: Path,
    data: Path,
    data_format: str,
    work: Path,
    *,
    trusted: bool = False,
    evaluation: Path | None = None,
) -> tuple[JobResult, dict[str, Path]]:
    work.mkdir(exist_ok=True)
    progress: list[Progress] = []
    result, exports = execute(
        spec,
        JobFiles(model, "hf", data, data_format, evaluation, work),
        CPU,
        trusted,
        progress.append,
    )
    assert [p.step for p in progress if p.stage == "pruning"] == [1, 2]
    # every step's MACs, params and loss, in the result and in the progress it reported
    steps = result.steps
    assert [s.step for s in steps] == [1, 2]
    assert steps[0].macs > steps[1].macs == result.macs_after
    assert all(s.loss is not None and math.isfinite(s.loss) for s in steps)
    assert all(s.seconds_scoring > 0 for s in steps)
    # where the time went: scoring and BatchNorm recalibration are parts of pruning
    seconds = result.seconds
    assert 0 < seconds["score"] + seconds["recalibrate"] <= seconds["prune"]
    pruning = [p for p in progress if p.stage == "pruning"]
    assert [(p.macs, p.params) for p in pruning] == [(s.macs, s.params) for s in steps]
    # each step's loss came from the next step's scoring pass; the last one's from the
    # after-pruning measurement on the same batches
    if result.evaluated_on == "calibration":
        assert steps[-1].loss == result.after_pruning.loss
    return result, {e.format: e.path for e in exports}


def _unzip(archive: Path, into: Path) -> Path:
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(into)
    return into


@pytest.mark.slow  # over 5 s: every portable export
def test_text_classification_from_jsonl_to_every_portable_format(tmp_path: Path) -> None:
    model = factories.bert_folder(tmp_path)
    data = factories.jsonl_file(tmp_path / "data.jsonl")
    spec = factories.spec(
        outputs=["hf", "safetensors", "onnx", "pt2"],
        evaluation={"dataset_id": None, "fraction": 0.25},
        finetune={"epochs": 1, "lr": 1e-3},
    )

    result, files = _run(spec, model, data, "jsonl", tmp_path / "work")

    assert result.macs_after <= 0.5 * result.macs_before
    assert result.evaluated_on == "held_out"
    for stage in ("before", "after_pruning", "after_finetune"):
        assert set(getattr(result, stage).model_dump()) == {"loss", "accuracy", "latency_ms"}
    onnx, pt2 = result.exports["onnx"].max_abs_diff, result.exports["pt2"].max_abs_diff
    assert onnx is not None and onnx <= 1e-4 and pt2 is not None and pt2 <= 1e-5
    shape = result.example_inputs["input_ids"]
    tokens = {"input_ids": torch.full(shape, 4, dtype=torch.long)}

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        _unzip(files["hf"], tmp_path / "hf")
    ).eval()
    assert measure(hf, tokens).macs == result.macs_after
    with torch.no_grad():
        expected = hf(**tokens).logits

    # safetensors + plan: the original architecture, shaped by the plan, takes the weights
    folder = _unzip(files["safetensors"], tmp_path / "st")
    original = transformers.AutoModelForSequenceClassification.from_pretrained(model).eval()
    plan = Plan.from_json(json.loads((folder / "pruning-plan.json").read_text()))
    rebuilt = apply_plan_(original, {"input_ids": torch.zeros(1, 12, dtype=torch.long)}, plan)
    rebuilt.load_state_dict(load_file(str(folder / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**tokens).logits, expected)

    # pt2 and ONNX run without this project's code, on the traced input shape
    example = {"input_ids": torch.randint(4, 14, shape), "attention_mask": torch.ones(shape).long()}
    with torch.no_grad():
        reference = hf(**example).logits
    program = torch.export.load(str(files["pt2"])).module()
    torch.testing.assert_close(program(*example.values()), reference)
    session = onnxruntime.InferenceSession(str(files["onnx"]))
    feeds = {i.name: example[i.name].numpy() for i in session.get_inputs() if i.name in example}
    assert np.abs(session.run(None, feeds)[0] - reference.numpy()).max() <= 1e-4
    # the batch axis is dynamic: three rows at once give the three rows' outputs
    batch = {k: np.concatenate([v] * 3) for k, v in feeds.items()}
    assert session.run(None, batch)[0].shape[0] == 3


def test_image_classification_from_an_imagefolder(tmp_path: Path) -> None:
    model = factories.vit_folder(tmp_path)
    data = factories.imagefolder_zip(tmp_path / "images.zip")
    columns = datasets.load(data, "imagefolder", models.load_hf(model, trusted=False))
    _predict_a_third_as_class_0(model, columns["pixel_values"])

    result, files = _run(factories.spec(), model, data, "imagefolder", tmp_path / "work")

    assert result.macs_after <= 0.5 * result.macs_before
    # Without an evaluation set, accuracy is over the calibration rows (2 batches of 16: all
    # 24 images): the original model's before, the exported pruned model's after pruning.
    original = transformers.AutoModelForImageClassification.from_pretrained(model).eval()
    pruned = transformers.AutoModelForImageClassification.from_pretrained(
        _unzip(files["hf"], tmp_path / "hf")
    ).eval()

    def accuracy(vit: torch.nn.Module) -> float:
        with torch.no_grad():
            predicted = vit(pixel_values=columns["pixel_values"]).logits.argmax(-1)
        return int((predicted == columns["labels"]).sum()) / len(predicted)

    assert 0.5 < accuracy(original) < 1  # neither constant predictions nor all right
    assert result.before.accuracy == accuracy(original)
    assert result.after_pruning.accuracy == accuracy(pruned)


def _predict_a_third_as_class_0(folder: Path, pixel_values: torch.Tensor) -> None:
    """Shift the saved classifier's bias so that the third of the images with the lowest
    class-1 margin are predicted class 0. The random head predicts class 1 for every image,
    and on a balanced set an accuracy counted wrongly would read 0.5 as well."""
    vit = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = vit(pixel_values=pixel_values).logits
        margins = (logits[:, 1] - logits[:, 0]).sort().values
        third = len(margins) // 3
        vit.classifier.bias[1] -= (margins[third - 1] + margins[third]) / 2
    vit.save_pretrained(folder)


def test_tensors_with_a_separate_evaluation_set_and_a_distillation_loss(tmp_path: Path) -> None:
    model = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "train.safetensors")
    held_out = factories.tensors_file(tmp_path / "eval.safetensors", rows=32, seed=1)
    spec = factories.spec(
        method="oba_full",
        loss="distill",
        target={"params": 0.8},
        evaluation={"dataset_id": "x", "fraction": None},
    )

    result, _ = _run(spec, model, data, "tensors", tmp_path / "work", evaluation=held_out)

    assert result.evaluated_on == "held_out"
    assert result.params_after <= 0.8 * result.params_before
    assert result.before.loss == pytest.approx(0.0, abs=1e-6)  # student = teacher


def test_before_pruning_a_distilled_model_is_its_teacher_and_takes_no_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = factories.bert_folder(tmp_path)
    data = factories.jsonl_file(tmp_path / "data.jsonl", labels=False)
    evaluated: list[int] = []
    evaluate = evaluation.evaluate

    def counted(*args: Any) -> dict[str, float]:
        evaluated.append(1)
        return evaluate(*args)

    monkeypatch.setattr(evaluation, "evaluate", counted)

    result, _ = _run(factories.spec(loss="distill"), model, data, "jsonl", tmp_path / "work")

    assert result.before.loss == 0.0 and result.before.accuracy is None
    assert result.after_pruning.loss > 0
    assert len(evaluated) == 1  # after pruning only


def test_a_pickle_output_only_in_trusted_mode(tmp_path: Path) -> None:
    model = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "train.safetensors")

    result, files = _run(
        factories.spec(outputs=["torch_pickle", "safetensors"]),
        model,
        data,
        "tensors",
        tmp_path / "work",
        trusted=True,
    )

    loaded = torch.load(files["torch_pickle"], weights_only=False)
    # the pruned model itself: its MACs, and the weights the safetensors export holds
    tokens = {"input_ids": torch.full(result.example_inputs["input_ids"], 4)}
    assert measure(loaded, tokens).macs == result.macs_after
    weights = load_file(str(_unzip(files["safetensors"], tmp_path / "st") / "model.safetensors"))
    state = loaded.state_dict()
    assert set(state) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name


def test_an_unreachable_target_fails_before_pruning_with_the_reachable_value(
    tmp_path: Path,
) -> None:
    model = factories.bert_folder(tmp_path, intermediate=64)  # FFN 2× hidden: hf can't halve it
    data = factories.tensors_file(tmp_path / "data.safetensors")
    progress: list[Progress] = []

    with pytest.raises(EngineError) as raised:
        execute(
            factories.spec(target={"macs": 0.5}, outputs=["hf"]),
            JobFiles(model, "hf", data, "tensors", None, tmp_path),
            CPU,
            False,
            progress.append,
        )

    assert raised.value.code == "target_unreachable"
    assert "keeps at least 0." in str(raised.value)
    assert not [p for p in progress if p.stage == "pruning"]


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_a_loss_that_needs_labels_fails_early_on_data_without_them(
    tmp_path: Path, loss: str
) -> None:
    model = factories.bert_folder(tmp_path)
    data = factories.jsonl_file(tmp_path / "texts.jsonl", labels=False)
    progress: list[Progress] = []

    with pytest.raises(JobFailed) as raised:
        execute(
            factories.spec(loss=loss),
            JobFiles(model, "hf", data, "jsonl", None, tmp_path),
            CPU,
            False,
            progress.append,
        )

    assert raised.value.code == "missing_labels"
    assert "'labels'" in str(raised.value) and "distill" in str(raised.value)
    assert [p.stage for p in progress] == ["loading"]


class Stop(Exception):
    """What the lifecycle's report raises when the job is being cancelled."""


@pytest.mark.parametrize("stage", ["loading", "measuring", "pruning", "finetuning", "exporting"])
def test_a_cancel_is_seen_at_every_stage(tmp_path: Path, stage: str) -> None:
    model = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "data.safetensors")
    seen: list[str] = []

    def report(progress: Progress) -> None:
        seen.append(str(progress.stage))
        if progress.stage == stage:
            raise Stop

    with pytest.raises(Stop):
        execute(
            factories.spec(finetune={"epochs": 1, "lr": 1e-3}, outputs=["hf", "safetensors"]),
            JobFiles(model, "hf", data, "tensors", None, tmp_path),
            CPU,
            False,
            report,
        )

    assert seen[-1] == stage and seen.count(stage) == 1  # stopped at the stage's first report


def test_a_cancel_is_seen_between_fine_tuning_batches(tmp_path: Path) -> None:
    model = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "data.safetensors", rows=128)
    epochs: list[int] = []
    checks = 0

    def report(progress: Progress) -> None:
        if progress.stage == "finetuning":
            epochs.append(progress.epoch or 0)

    def check() -> None:
        nonlocal checks
        checks += 1
        if checks == 2:  # the second batch of the first epoch
            raise Stop

    with pytest.raises(Stop):
        execute(
            factories.spec(
                finetune={"epochs": 3, "lr": 1e-3}, calibration={"batches": 8, "batch_size": 16}
            ),
            JobFiles(model, "hf", data, "tensors", None, tmp_path),
            CPU,
            False,
            report,
            check,
        )

    assert epochs == [0]  # started, and stopped before the first epoch ended


def test_a_family_of_targets_yields_one_model_set_per_target(tmp_path: Path) -> None:
    """One run through 0.8, 0.6 and 0.45 of the MACs: each member's files carry its target and
    its numbers shrink in order; the last safetensors plan (three plans in one) rebuilds the
    original architecture into the last model."""
    model = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "data.safetensors")
    spec = factories.spec(
        targets=[{"macs": 0.8}, {"macs": 0.6}, {"macs": 0.45}],
        schedule={"steps": 6},
        outputs=["hf", "safetensors"],
    )
    progress: list[Progress] = []
    work = tmp_path / "work"
    work.mkdir()

    result, exports = execute(
        spec, JobFiles(model, "hf", data, "tensors", None, work), CPU, False, progress.append
    )

    family = result.family or []
    assert [m.target for m in family] == [{"macs": 0.8}, {"macs": 0.6}, {"macs": 0.45}]
    macs = [m.macs_after for m in family]
    assert macs == sorted(macs, reverse=True) and macs[-1] == result.macs_after
    for member, goal in zip(family, (0.8, 0.6, 0.45), strict=True):
        assert member.macs_after <= goal * result.macs_before
    steps = [p.step for p in progress if p.stage == "pruning"]
    assert steps == list(range(1, len(steps) + 1)) and len(result.steps) == len(steps)
    names = sorted(e.path.name for e in exports)
    assert names == sorted(
        f"model-{fmt}.macs-{goal}.zip" for fmt in ("hf", "safetensors") for goal in (0.8, 0.6, 0.45)
    )
    assert {tuple(e.target.items()) for e in exports if e.target} == {
        (("macs", 0.8),),
        (("macs", 0.6),),
        (("macs", 0.45),),
    }
    middle = next(e.path for e in exports if e.path.name == "model-hf.macs-0.6.zip")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        _unzip(middle, tmp_path / "hf")
    ).eval()
    tokens = {"input_ids": torch.full(result.example_inputs["input_ids"], 4, dtype=torch.long)}
    assert measure(hf, tokens).macs == family[1].macs_after
    last = next(e.path for e in exports if e.path.name == "model-safetensors.macs-0.45.zip")
    folder = _unzip(last, tmp_path / "st")
    original = transformers.AutoModelForSequenceClassification.from_pretrained(model).eval()
    plan = Plan.from_json(json.loads((folder / "pruning-plan.json").read_text()))
    rebuilt = apply_plan_(original, tokens, plan)
    rebuilt.load_state_dict(load_file(str(folder / "model.safetensors")))
    assert measure(rebuilt, tokens).macs == result.macs_after


@pytest.mark.parametrize(
    ("targets", "says"),
    [
        ([{"macs": 0.5}, {"macs": 0.7}], "keep less at each step"),
        ([{"macs": 0.7}, {"params": 0.5}], "one metric"),
        ([{"sparsity": 0.5}, {"sparsity": 0.7}], "one metric"),
    ],
)
def test_a_family_must_shrink_in_one_metric(targets: list[dict[str, float]], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        factories.spec(targets=targets)


def test_steps_are_shared_by_how_far_each_target_shrinks() -> None:
    assert steps_per_goal(10, [0.5]) == [10]
    assert steps_per_goal(6, [0.8, 0.6, 0.45]) == [2, 2, 2]
    assert steps_per_goal(10, [0.9, 0.1]) == [1, 10]  # at least one step each


def test_exported_weights_are_stored_and_configs_deflated(tmp_path: Path) -> None:
    """Deflating float weights costs seconds per 100 MB for about 8% smaller downloads."""
    model = factories.bert_folder(tmp_path)
    data = factories.tensors_file(tmp_path / "data.safetensors")

    _, files = _run(factories.spec(outputs=["hf"]), model, data, "tensors", tmp_path / "work")

    with zipfile.ZipFile(files["hf"]) as bundle:
        methods = {info.filename: info.compress_type for info in bundle.infolist()}
    assert methods["model.safetensors"] == zipfile.ZIP_STORED
    assert methods["config.json"] == zipfile.ZIP_DEFLATED


def test_spec_switches_reach_the_engine_configuration() -> None:
    spec = build_spec(
        {"model_id": "m", "dataset_id": "d"},
        SpecOptions(normalisation="lamp", cost_aware=False, max_memory="1GiB"),
    )
    checked = JobSpec.model_validate(spec)
    assert checked.calibration.max_memory == 2**30
    assert prune_config(checked).normalisation == "lamp"
    assert prune_config(checked).cost_aware is False
    assert prune_config(factories.spec()).normalisation == "max"
    assert prune_config(factories.spec()).cost_aware is True
    searching = SpecOptions(
        search=3, search_recovery="finetune", finetune_epochs=1, eval_fraction=0.2
    )
    search = JobSpec.model_validate(build_spec({"model_id": "m", "dataset_id": "d"}, searching))
    assert search.search.finetunes and search.finetune is not None


@pytest.mark.parametrize(
    ("given", "bytes_"), [("2GiB", 2 * 2**30), ("1.5 MiB", 3 * 2**19), ("512MB", 512 * 10**6)]
)
def test_max_memory_takes_sizes_people_write(given: str, bytes_: int) -> None:
    spec = build_spec({"model_id": "m", "dataset_id": "d"}, SpecOptions(max_memory=given))
    assert spec["calibration"]["max_memory"] == bytes_


def test_a_latency_target_and_its_batch_from_the_command_line() -> None:
    given = SpecOptions(target="latency_ms=5, batch=32")
    spec = build_spec({"model_id": "m", "dataset_id": "d"}, given)
    assert spec["target"] == {"latency_ms": 5.0, "batch": 32}
    assert JobSpec.model_validate(spec).target.batch == 32
