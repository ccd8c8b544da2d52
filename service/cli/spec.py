"""The job-spec options `apoptosis jobs submit` and `apoptosis prune` share: one `SpecOptions`
object (each field one command-line option, or `--spec` for a JSON spec) and `build_spec`, the
one translation of them into a job spec, checked as the API checks it."""

import dataclasses
import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer
from pydantic import ByteSize, TypeAdapter, ValidationError

from service.cli.output import fail
from service.jobs.schemas import JobSpec
from service.jobs.vocabulary import allocations, methods

Opt = typer.Option
SpecFile = Annotated[
    Path | None,
    Opt("--spec", exists=True, dir_okay=False, help="a JSON job spec; options override its fields"),
]
Method = Annotated[str | None, Opt(help=" | ".join(methods()))]
Granularity = Annotated[str | None, Opt(help="channel | layer | unstructured | 2:4")]
HiddenSize = Annotated[
    bool | None, Opt(help="prune a transformer's hidden size (default: where its config says)")
]
CostAware = Annotated[
    bool | None,
    Opt(
        "--cost-aware/--not-cost-aware",
        help="rank channels by score per MAC saved (default), or by score alone",
    ),
]
DepthShare = Annotated[
    float | None, Opt(help="channel: share of the reduction taken by whole blocks first")
]
BlockScore = Annotated[
    str | None,
    Opt(help="how whole blocks are chosen: loss (default) | influence (1 - cos, ShortGPT's)"),
]
Normalisation = Annotated[
    str | None,
    Opt(
        help=" | ".join(allocations())
        + ": how removal is spread over layers (max, the default; lamp spreads it more evenly, "
        "for fine-tuning; lamp_rank_sum with --not-cost-aware recovers best on CNNs)"
    ),
]
TargetOpt = Annotated[
    str | None, Opt(help="macs=0.5 | params=0.5 | sparsity=0.5 | latency_ms=5,batch=32")
]
TargetsOpt = Annotated[
    str | None, Opt(help="a family from one run: macs=0.75,0.5,0.3 (one model set each)")
]
Steps = Annotated[int | None, Opt(help="pruning steps")]
ScheduleKind = Annotated[str | None, Opt(help="exponential | linear")]
Loss = Annotated[str | None, Opt(help="cross_entropy | mse | distill | causal_lm")]
Batches = Annotated[int | None, Opt(help="calibration batches per step")]
BatchSize = Annotated[int | None, Opt(help="calibration rows per batch")]
MaxMemory = Annotated[
    str | None,
    Opt(
        metavar="SIZE",
        help="memory one scoring pass may use: 512MiB, 2GiB (2GB is 2·10⁹) or bytes; larger "
        "batches go in micro-batches",
    ),
]
Epochs = Annotated[int | None, Opt("--finetune-epochs", help="fine-tune after pruning")]
LearningRate = Annotated[float | None, Opt("--finetune-lr", help="fine-tuning learning rate")]
FinetuneDistill = Annotated[
    bool | None,
    Opt(
        "--finetune-distill/--finetune-on-loss",
        help="fine-tune by distillation from the uploaded model, or by the job's loss "
        "(default: a causal LM distils)",
    ),
]
EvalFraction = Annotated[
    float | None, Opt("--eval-fraction", help="evaluate on this last fraction of the rows")
]
EvalDataset = Annotated[str | None, Opt("--eval-dataset", help="evaluate on this dataset")]
SearchCandidates = Annotated[
    int | None,
    Opt(
        "--search",
        help="try this many allocations (1-8) and keep the one that recovers best on the "
        "held-out rows; needs --eval-fraction or --eval-dataset",
    ),
]
SearchRecovery = Annotated[
    str | None,
    Opt(
        "--search-recovery",
        help="with --search: short (recovery rows, then the fine-tune on the winner) | "
        "finetune (the fine-tune on each; judged by accuracy where labels are classes)",
    ),
]
RecoveryRows = Annotated[
    int | None, Opt("--recovery-rows", help="with --search: rows of each candidate's recovery")
]
ImageSize = Annotated[int | None, Opt("--image-size", help="images: resize to this side")]
Mean = Annotated[str | None, Opt(help="images: per-channel mean, comma-separated")]
Std = Annotated[str | None, Opt(help="images: per-channel std, comma-separated")]
Outputs = Annotated[str | None, Opt(help="comma-separated: hf,safetensors,onnx,pt2,torch_pickle")]
NotifyUrl = Annotated[str | None, Opt(help="POST signed notifications of state changes here")]


@dataclasses.dataclass(frozen=True)
class SpecOptions:
    """What a job does, as given on the command line (None: from `--spec`, or the default)."""

    spec_file: SpecFile = None
    target: TargetOpt = None
    targets: TargetsOpt = None
    method: Method = None
    granularity: Granularity = None
    hidden_size: HiddenSize = None
    depth_share: DepthShare = None
    block_score: BlockScore = None
    normalisation: Normalisation = None
    cost_aware: CostAware = None
    steps: Steps = None
    schedule_kind: ScheduleKind = None
    loss: Loss = None
    batches: Batches = None
    batch_size: BatchSize = None
    max_memory: MaxMemory = None
    finetune_epochs: Epochs = None
    finetune_lr: LearningRate = None
    finetune_distill: FinetuneDistill = None
    eval_fraction: EvalFraction = None
    search: SearchCandidates = None
    search_recovery: SearchRecovery = None
    recovery_rows: RecoveryRows = None
    image_size: ImageSize = None
    mean: Mean = None
    std: Std = None
    outputs: Outputs = None


def with_spec_options(command: Callable[..., None]) -> Callable[..., None]:
    """`command`, whose parameter `options: SpecOptions` Typer shows as one option per field.

    Typer builds a command's options from its function's parameters and has no groups of them;
    this gives it a signature with the fields in place of `options` and gathers them back."""
    fields = get_type_hints(SpecOptions, include_extras=True)
    signature = inspect.signature(command)
    parameters: list[inspect.Parameter] = []
    for parameter in signature.parameters.values():
        if parameter.name == "options":
            parameters += [
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=hint
                )
                for name, hint in fields.items()
            ]
        elif parameters and parameters[-1].kind == inspect.Parameter.KEYWORD_ONLY:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        else:
            parameters.append(parameter)

    @functools.wraps(command)
    def gathered(*args: Any, **kwargs: Any) -> None:
        options = SpecOptions(**{name: kwargs.pop(name) for name in fields})
        command(*args, options=options, **kwargs)

    gathered.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return gathered


def build_spec(
    base: dict[str, Any],
    options: SpecOptions,
    *,
    eval_dataset: str | None = None,
    notify_url: str | None = None,
) -> dict[str, Any]:
    """A job spec from `--spec` (if any) and the options given, checked as the API checks it."""
    given = options
    spec: dict[str, Any] = json.loads(given.spec_file.read_text()) if given.spec_file else {}
    spec |= base
    flat = {
        "method": given.method,
        "granularity": given.granularity,
        "hidden_size": given.hidden_size,
        "depth_share": given.depth_share,
        "block_score": given.block_score,
        "normalisation": given.normalisation,
        "cost_aware": given.cost_aware,
        "loss": given.loss,
        "notify_url": notify_url,
        "outputs": given.outputs.split(",") if given.outputs else None,
    }
    spec |= {key: value for key, value in flat.items() if value is not None}
    if given.target:
        spec["target"] = _target(given.target)
    if given.targets:
        metric, _, values = given.targets.partition("=")
        example = "macs=0.75,0.5,0.3"
        spec["targets"] = [{metric: _number(v, "--targets", example)} for v in values.split(",")]
        spec.pop("target", None)  # the last of the family
    _merge(spec, "schedule", steps=given.steps, kind=given.schedule_kind)
    memory = None if given.max_memory is None else _size(given.max_memory, "--max-memory")
    _merge(
        spec, "calibration", batches=given.batches, batch_size=given.batch_size, max_memory=memory
    )
    _merge(
        spec,
        "finetune",
        epochs=given.finetune_epochs,
        lr=given.finetune_lr,
        distill=given.finetune_distill,
    )
    _merge(spec, "evaluation", fraction=given.eval_fraction, dataset_id=eval_dataset)
    _merge(
        spec,
        "search",
        candidates=given.search,
        recovery=given.search_recovery,
        recovery_rows=given.recovery_rows,
    )
    mean, std = _floats(given.mean, "--mean"), _floats(given.std, "--std")
    _merge(spec, "preprocess", size=given.image_size, mean=mean, std=std)
    try:
        JobSpec.model_validate(spec)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "spec"
        fail(f"invalid job spec: {where}: {problem['msg']}")
    return spec


def _target(text: str) -> dict[str, float | int]:
    """`macs=0.5`, or a latency and the rows it is timed at: `latency_ms=5,batch=32`."""
    example = "macs=0.5 or latency_ms=5,batch=32"
    target: dict[str, float | int] = {}
    for part in text.split(","):
        key, equals, value = (piece.strip() for piece in part.partition("="))
        if not equals or not key:
            fail(
                f"--target wants name=value, as in {example}; got {text!r} (several "
                "targets, a family: --targets macs=0.75,0.5,0.3)"
            )
        if key in target:
            fail(f"--target names {key} twice; got {text!r}")
        number = _number(value, "--target", example)
        target[key] = int(number) if key == "batch" and number.is_integer() else number
    return target


def _merge(spec: dict[str, Any], part: str, **values: Any) -> None:
    given = {key: value for key, value in values.items() if value is not None}
    if given:
        spec[part] = (spec.get(part) or {}) | given


def _number(text: str, option: str, example: str) -> float:
    try:
        return float(text)
    except ValueError:
        fail(f"{option} wants a number, as in {example}; got {text!r}")


def _size(text: str | int, option: str) -> int:
    """Bytes from 2GiB, 512MB, 1.5 GiB or a plain count (pydantic's ByteSize reads them)."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        fail(f"{option} wants a size, as in 512MiB or 2GiB; got {text!r}")


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    return [_number(part, option, "0.5,0.5,0.5") for part in text.split(",")]
