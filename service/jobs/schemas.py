"""The job spec (DESIGN §4) and job resources."""

import itertools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from service.core.timestamps import UtcDatetime
from service.jobs.results import JobResult, Progress
from service.jobs.vocabulary import allocations, methods

OutputFormat = Literal["hf", "safetensors", "onnx", "pt2", "torch_pickle"]


def _default_outputs() -> list[OutputFormat]:
    return ["hf"]


# What one spec may ask for (a 422 names the limit): calibration rows scored per step × steps,
# fine-tuning rows × epochs. A CPU worker scores ~1,000 rows of a small BERT a second.
MAX_SCORED_ROWS = 2_000_000  # calibration batches × batch size × steps
MAX_FINETUNE_ROWS = 5_000_000  # calibration batches × batch size × epochs
MAX_CANDIDATES = 8  # allocations a search tries: normaliser × schedule × cost-awareness
MAX_RECOVERY_ROWS = 8192  # rows of each candidate's short recovery in a search


class SpecPart(BaseModel):
    """Every part of a spec: unknown fields, NaN / ±Infinity and text UTF-8 cannot encode are
    refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        # JSON may hold a lone surrogate ("\ud800"): the database driver would fail on it as a
        # 500. pydantic refuses it already in strings with a length or pattern; this is the
        # same error for plain ones (ids).
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                raise PydanticCustomError(
                    "string_unicode",
                    "Input should be a valid string, unable to parse raw data as a unicode string",
                ) from None
        return value


METRICS = ("macs", "params", "sparsity", "latency_ms")


class Target(SpecPart):
    """Keep at most this fraction of MACs or parameters, zero this fraction of weights, or run
    one forward pass of `batch` rows in at most `latency_ms` on the worker's device."""

    macs: float | None = Field(default=None, gt=0, lt=1)
    params: float | None = Field(default=None, gt=0, lt=1)
    sparsity: float | None = Field(default=None, gt=0, lt=1)
    latency_ms: float | None = Field(default=None, gt=0, le=600_000)
    batch: int = Field(default=1, ge=1, le=4096)  # rows per forward pass a latency is timed at

    @model_validator(mode="after")
    def _exactly_one(self) -> "Target":
        if sum(getattr(self, metric) is not None for metric in METRICS) != 1:
            raise ValueError("give exactly one of macs, params, sparsity or latency_ms")
        if self.batch != 1 and self.latency_ms is None:
            raise ValueError("batch goes with a latency_ms target")
        return self

    @property
    def metric(self) -> str:
        return next(k for k in METRICS if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.metric))


class Schedule(SpecPart):
    steps: int = Field(default=10, ge=1, le=500)
    kind: Literal["exponential", "linear"] = "exponential"


class Calibration(SpecPart):
    batches: int = Field(default=8, ge=1, le=10_000)
    batch_size: int = Field(default=32, ge=1, le=4096)
    # bytes one scoring pass may use; batches that would not fit are scored in micro-batches
    # (default: what the worker has free)
    max_memory: int | None = Field(default=None, ge=2**20)


class Finetune(SpecPart):
    epochs: int = Field(default=1, ge=0, le=100)
    lr: float = Field(default=1e-3, gt=0, le=1)
    # fine-tune by distillation from the uploaded model (KL on every output distribution, as
    # Minitron recovers) rather than by the job's loss; null: a causal LM's does
    distill: bool | None = None


class Search(SpecPart):
    """Choose the allocation by how it recovers: prune `candidates` ways (the spec's own
    allocation first), give each the same recovery, keep the best on the held-out rows
    (docs/formats.md). `recovery` "short": `recovery_rows` calibration rows, judged by the
    loss, then the job's fine-tune on the winner; "finetune": the job's whole fine-tune on
    each, judged by accuracy where the labels are classes (else the loss). One candidate is a
    job as it always was."""

    candidates: int = Field(default=1, ge=1, le=MAX_CANDIDATES)
    recovery: Literal["short", "finetune"] = "short"
    recovery_rows: int = Field(default=256, ge=1, le=MAX_RECOVERY_ROWS)

    @property
    def finetunes(self) -> bool:
        """Each candidate gets the job's fine-tune, and the winner none after."""
        return self.candidates > 1 and self.recovery == "finetune"


class Evaluation(SpecPart):
    """Where before/after metrics come from: a separate dataset, or the last fraction of rows."""

    dataset_id: str | None = None
    fraction: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_source(self) -> "Evaluation":
        if (self.dataset_id is None) == (self.fraction is None):
            raise ValueError("give exactly one of dataset_id or fraction")
        return self


class Preprocess(SpecPart):
    """Image preprocessing when the model's preprocessor_config.json should not decide."""

    size: int | None = Field(default=None, ge=8, le=4096)
    mean: list[float] | None = Field(default=None, min_length=1, max_length=4)
    std: list[Annotated[float, Field(gt=0)]] | None = Field(
        default=None, min_length=1, max_length=4
    )


class Mlflow(SpecPart):
    """Log the job to an MLflow tracking server: the spec as params, before/after and per-step
    metrics, the report and the pruned model as artifacts."""

    tracking_uri: str = Field(max_length=2000, pattern=r"^https?://")
    experiment: str = Field(default="apoptosis", min_length=1, max_length=200)
    run_name: str | None = Field(default=None, min_length=1, max_length=200)


class JobSpec(SpecPart):
    """What a job does. The API validates it at submit and stores it as JSON; the worker
    validates the stored JSON with this same model before it runs the job."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"model_id": "3f1c…", "dataset_id": "9a07…", "target": {"macs": 0.5}},
                {
                    "model_id": "3f1c…",
                    "dataset_id": "9a07…",
                    "method": "oba",
                    "granularity": "channel",
                    "target": {"params": 0.6},
                    "schedule": {"steps": 10},
                    "calibration": {"batches": 8, "batch_size": 32},
                    "finetune": {"epochs": 1, "lr": 0.0005},
                    "evaluation": {"fraction": 0.2},
                    "outputs": ["hf", "onnx"],
                    "notify_url": "https://ci.example/hooks/apoptosis",
                },
            ]
        },
    )

    # the spec's layout: a worker refuses (`invalid_job`) a version it does not know
    spec_version: Literal[1] = 1
    model_id: str
    dataset_id: str
    # the scorer: a built-in or a plugin's (service/jobs/vocabulary.py)
    method: str = Field(default="oba", json_schema_extra=lambda s: _names(s, methods()))
    granularity: Literal["channel", "layer", "unstructured", "2:4"] = "channel"
    # transformers: prune the hidden size too (null: where the config can state it)
    hidden_size: bool | None = None
    # channel granularity: share (in log space) of the reduction taken by whole blocks first
    depth_share: float = Field(default=0.0, ge=0, le=1)
    # how whole blocks are chosen (granularity "layer", or depth_share): "loss", the predicted
    # loss change (least now first), or "influence", ShortGPT's 1 − cos(block input, output)
    block_score: Literal["loss", "influence"] = "loss"
    # how channel scores compare across layers: "max" (OBA's) or "lamp" (spreads removal more
    # evenly; fine-tunes better at 2×, docs/decisions/0007-lamp-normaliser-as-an-option.md), or
    # "lamp_weights" (each layer keeps as many as LAMP on the weights' magnitudes; the scores
    # choose which), "lamp_rank_sum" (the same widths; the scores' rank plus the weights' rank
    # choose which) (the allocation rule: a built-in or a plugin's)
    normalisation: str = Field(default="max", json_schema_extra=lambda s: _names(s, allocations()))
    # rank channels by score per MAC (or parameter) each saves; false: by score alone, which
    # takes more channels and fine-tuned better at 2× on the CNNs (docs/benchmarks/quality.md)
    cost_aware: bool = True
    target: Target = Field(default_factory=lambda: Target(macs=0.5))
    # A family of models from one run: the model at each target, in order (one metric, each
    # smaller than the last); `target` is then the last of them.
    targets: list[Target] | None = Field(default=None, min_length=2, max_length=6)
    schedule: Schedule = Field(default_factory=Schedule)
    calibration: Calibration = Field(default_factory=Calibration)
    loss: Literal["cross_entropy", "mse", "distill", "causal_lm"] = "cross_entropy"
    finetune: Finetune | None = None
    evaluation: Evaluation | None = None
    # candidate allocations judged after a recovery (one: no search, as before)
    search: Search = Field(default_factory=Search)
    preprocess: Preprocess | None = None
    # each format once: a repeated format is one export
    outputs: list[OutputFormat] = Field(
        default_factory=_default_outputs, min_length=1, max_length=5
    )
    # POSTed a signed notification (Standard Webhooks) at each state change of the job
    notify_url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://")
    mlflow: Mlflow | None = None

    @model_validator(mode="before")
    @classmethod
    def _target_is_the_last_of_targets(cls, data: Any) -> Any:
        targets = data.get("targets") if isinstance(data, dict) else None
        # anything but a non-empty list is left for the field's own validation to refuse
        if isinstance(targets, list) and targets and "target" not in data:
            return {**data, "target": targets[-1]}
        return data

    @field_validator("method")
    @classmethod
    def _a_known_method(cls, method: str) -> str:
        return _known(method, methods(), "scoring method")

    @field_validator("normalisation")
    @classmethod
    def _a_known_allocation(cls, name: str) -> str:
        return _known(name, allocations(), "allocation rule")

    @property
    def uniform_widths(self) -> bool:
        """Every layer of a kind keeps one width: an `hf` output's config states one per kind
        (the API's reachability check and the worker's pruning both follow this)."""
        return "hf" in self.outputs

    @property
    def removes_blocks(self) -> bool:
        """Whole transformer blocks go: `layer` granularity, or a depth share with channels."""
        return self.granularity == "layer" or bool(self.depth_share)

    @property
    def distils_from_the_original(self) -> bool:
        """A loss other than `distill` that still needs the uploaded model kept frozen beside
        the pruned one: a fine-tune that distils (`finetune.distill`, by default a causal
        LM's), or a causal LM's search, whose candidates recover by distillation."""
        if self.loss == "distill":
            return False
        searching = self.search.candidates > 1 and self.loss == "causal_lm"
        return searching or self.finetune_distils

    @property
    def finetune_distils(self) -> bool:
        """The fine-tune distils from the uploaded model instead of minimising the job's loss
        (a `distill` job's loss is that distillation already)."""
        if self.finetune is None or self.loss == "distill":
            return False
        if self.finetune.distill is None:
            return self.loss == "causal_lm"
        return self.finetune.distill

    @property
    def goals(self) -> list[Target]:
        """The targets the job passes through, in order (one for a plain job)."""
        return self.targets or [self.target]

    @model_validator(mode="after")
    def _a_family_shrinks_in_one_metric(self) -> "JobSpec":
        if self.targets is None:
            return self
        metrics = {goal.metric for goal in self.targets}
        values = [goal.value for goal in self.targets]
        if len(metrics) != 1 or self.targets[0].metric == "sparsity":
            raise ValueError("targets name one metric, macs or params, in each entry")
        if any(later >= earlier for earlier, later in itertools.pairwise(values)):
            raise ValueError("targets must keep less at each step: 0.75, then 0.5, then 0.3")
        if self.target != self.targets[-1]:
            raise ValueError("target is the last of targets: leave it out")
        if self.granularity != "channel" or self.depth_share:
            raise ValueError("targets need channel granularity without depth_share")
        return self

    @model_validator(mode="after")
    def _a_latency_is_reached_by_channels(self) -> "JobSpec":
        if self.target.metric != "latency_ms":
            return self
        if self.granularity != "channel" or self.depth_share or self.targets is not None:
            raise ValueError(
                "a latency_ms target needs channel granularity, one target and no depth_share"
            )
        return self

    @model_validator(mode="after")
    def _a_search_is_judged_on_held_out_rows(self) -> "JobSpec":
        if self.search.candidates == 1:
            if self.search.recovery == "finetune":  # nothing would be searched: say so
                raise ValueError(
                    'search.recovery "finetune" fine-tunes each of several candidates: set '
                    "search.candidates (2 to 8)"
                )
            return self
        # what a search does not try yet (docs/formats.md): one line each
        if self.target.metric == "latency_ms":
            raise ValueError("search.candidates > 1 is not built for a latency_ms target yet")
        if self.granularity not in ("channel", "layer"):
            raise ValueError(
                f"search.candidates > 1 needs channel or layer granularity ({self.granularity} "
                "is not built yet)"
            )
        if self.evaluation is None:
            raise ValueError(
                "search.candidates > 1 judges candidates on rows calibration never saw: set "
                "evaluation.fraction (e.g. 0.2) or evaluation.dataset_id"
            )
        if self.search.finetunes and (self.finetune is None or not self.finetune.epochs):
            raise ValueError(
                'search.recovery "finetune" gives each candidate the job\'s fine-tune: set '
                'finetune with at least one epoch (e.g. {"epochs": 1})'
            )
        return self

    @model_validator(mode="after")
    def _target_fits_granularity(self) -> "JobSpec":
        structured = self.granularity in ("channel", "layer")
        if structured and self.target.metric == "sparsity":
            raise ValueError(f"{self.granularity} pruning targets macs or params, not sparsity")
        if self.depth_share and self.granularity != "channel":
            raise ValueError("depth_share combines depth with channel pruning")
        if self.granularity == "unstructured" and self.target.metric != "sparsity":
            raise ValueError("unstructured pruning targets sparsity")
        if self.granularity == "2:4" and (
            self.target.metric != "sparsity" or self.target.value > 0.5
        ):
            raise ValueError("2:4 pruning zeroes half the weights: ask for sparsity 0.5 or less")
        rows = self.calibration.batches * self.calibration.batch_size
        # a search scores each candidate, and with recovery "finetune" fine-tunes each
        each, by = self.search.candidates, " × search.candidates"
        scored = rows * self.schedule.steps * each
        if scored > MAX_SCORED_ROWS:
            raise ValueError(
                f"calibration.batches × calibration.batch_size × schedule.steps"
                f"{by if each > 1 else ''} is {scored:,}; the limit is {MAX_SCORED_ROWS:,} rows "
                "scored"
            )
        tuned = 0 if self.finetune is None else rows * self.finetune.epochs
        tuned *= each if self.search.finetunes else 1
        if tuned > MAX_FINETUNE_ROWS:
            raise ValueError(
                f"calibration rows × finetune.epochs{by if self.search.finetunes else ''} is "
                f"{tuned:,}; the limit is {MAX_FINETUNE_ROWS:,} rows fine-tuned"
            )
        return self

    @field_validator("outputs")
    @classmethod
    def _each_output_once(cls, outputs: list[OutputFormat]) -> list[OutputFormat]:
        return list(dict.fromkeys(outputs))


def _names(schema: dict[str, Any], names: tuple[str, ...]) -> None:
    """The names a field accepts, in the OpenAPI document (those installed when it was built)."""
    schema["enum"] = list(names)


def _known(name: str, names: tuple[str, ...], what: str) -> str:
    if name not in names:
        raise PydanticCustomError(
            "unknown_name",
            "unknown {what} '{name}'; expected one of {names}",
            {"what": what, "name": name, "names": ", ".join(names)},
        )
    return name


def _unset(value: object) -> bool:
    return value is None


class JobError(BaseModel):
    code: str
    message: str
    # `target_unreachable` from pruning: the metric, the least fraction of it the job's
    # constraints reach, and what per-layer widths (an onnx, pt2 or safetensors output) reach
    # (left out when unset: every other error stays `{code, message}` on the wire)
    metric: str | None = Field(default=None, exclude_if=_unset)
    reachable: float | None = Field(default=None, exclude_if=_unset)
    per_layer: float | None = Field(default=None, exclude_if=_unset)


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    state: str
    model_id: str
    dataset_id: str | None
    spec: dict[str, Any]
    attempt: int
    progress: Progress
    result: JobResult | None
    error: JobError | None
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None


class JobReport(BaseModel):
    """`GET /v1/jobs/{id}/report` as JSON (the HTML page draws the same)."""

    job_id: str
    state: str
    spec: dict[str, Any]
    result: JobResult | None
    error: JobError | None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None
