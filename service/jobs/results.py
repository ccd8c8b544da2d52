"""What a job reports on its way and at its end, typed: the worker builds these records, the
API declares them (`JobOut`, so the OpenAPI document shows them), and the SDK, the CLI, the
report and MLflow logging read them by attribute. Optional parts a job did not produce are left
out of the JSON (`exclude_if`), so a result reads the same on the wire as it did untyped."""

from typing import Any, Literal

from pydantic import BaseModel, Field


def _unset(value: object) -> bool:
    return value is None


class Metrics(BaseModel):
    """Measured on the evaluation batches (held out, or the calibration batches)."""

    loss: float
    # where the labels are classes the model's head predicts
    accuracy: float | None = Field(default=None, exclude_if=_unset)
    # one forward pass of the example batch on the worker (measured with the model)
    latency_ms: float | None = Field(default=None, exclude_if=_unset)


class Step(BaseModel):
    """One pruning step: the sizes it left and the loss on the calibration batches."""

    step: int  # counted across a family's targets
    macs: int
    params: int
    loss: float | None  # measured by the next step's scoring pass (None while that is pending)
    seconds_scoring: float


class Difference(BaseModel):
    max_abs_diff: float
    relative_diff: float


class ExportChecks(BaseModel):
    """How an output was verified against the pruned module on the example batch."""

    max_abs_diff: float | None = Field(default=None, exclude_if=_unset)
    relative_diff: float | None = Field(default=None, exclude_if=_unset)
    loaded_with: str | None = Field(default=None, exclude_if=_unset)  # hf: the class it loaded
    # hf of a sentence-transformers folder: its outputs as loaded by that library, or why not
    sentence_transformers: Difference | str | None = Field(default=None, exclude_if=_unset)
    dynamic_batch: bool | None = Field(default=None, exclude_if=_unset)  # onnx, pt2
    # what was not loaded back, and why (safetensors of an upload without a config: the plan's
    # replay on the original architecture)
    not_verified: str | None = Field(default=None, exclude_if=_unset)


class LatencyRound(BaseModel):
    macs_kept: float
    latency_ms: float


class Latency(BaseModel):
    """A latency target's timings on the worker that pruned: one forward pass of `batch` rows."""

    target_ms: float
    batch: int
    before_ms: float
    after_ms: float
    noise_ms: float
    speedup: float
    macs_ratio: float
    round_to: int | None  # widths rounded to a multiple where this device rewards it
    rounds: list[LatencyRound]


class TrackingRun(BaseModel):
    """Where the job was logged in MLflow, or why it was not (`error`)."""

    tracking_uri: str
    run_id: str | None = Field(default=None, exclude_if=_unset)
    experiment_id: str | None = Field(default=None, exclude_if=_unset)
    artifacts_error: str | None = Field(default=None, exclude_if=_unset)
    error: str | None = Field(default=None, exclude_if=_unset)


class Candidate(BaseModel):
    """One allocation a job's search tried: pruned from the loaded model (a family's later
    members: from the member before) to the target, given the search's short recovery, judged
    by the loss on the held-out batches; or, where its pruning missed the target, dropped out
    with why (`missed`) and nothing measured."""

    normalisation: str
    schedule: str  # exponential | linear
    # a search that removes whole blocks (granularity "layer", or depth_share): how it chose
    # them and the share of the reduction they took; the blocks it removed, as numbered in the
    # loaded model
    block_score: str | None = Field(default=None, exclude_if=_unset)
    depth_share: float | None = Field(default=None, exclude_if=_unset)
    blocks_removed: list[int] | None = Field(default=None, exclude_if=_unset)
    # False: one that kept the hidden size (a search tries it where the spec leaves the switch
    # to the model and the model's hidden size would be pruned)
    hidden_size: bool | None = Field(default=None, exclude_if=_unset)
    # False: one that ranked channels by score alone, not per MAC saved
    cost_aware: bool | None = Field(default=None, exclude_if=_unset)
    widths: dict[str, int] = Field(default_factory=dict)  # as `JobResult.widths`
    macs: int | None = None
    params: int | None = None
    loss_after_pruning: float | None = None
    loss_after_recovery: float | None = None
    # a search that gives each candidate the job's fine-tune: held-out accuracy after it, where
    # the labels are classes (what such a search judges by)
    accuracy_after_recovery: float | None = Field(default=None, exclude_if=_unset)
    chosen: bool = False
    # the chosen one's: why it won, in one line
    why: str | None = Field(default=None, exclude_if=_unset)
    # whether it goes on recovered: False where the recovery raised its held-out loss (it is
    # then judged, and goes on, as it was right after pruning); None for one that dropped out
    recovery_kept: bool | None = Field(default=None, exclude_if=_unset)
    # one that dropped out: the target it missed, in one line
    missed: str | None = Field(default=None, exclude_if=_unset)
    # one whose allocation pruned to the very model an earlier one did (its number, from 1):
    # its figures are that one's, it was not recovered again and is not chosen
    same_as: int | None = Field(default=None, exclude_if=_unset)

    @property
    def allocation(self) -> str:
        """How it allocated the pruning, in a few words: its blocks (how chosen, which went,
        the depth share) where it removed blocks, else its normalisation and schedule."""
        if self.block_score is None:
            kept = ", hidden size kept" if self.hidden_size is False else ""
            cost = ", not cost-aware" if self.cost_aware is False else ""
            return f"{self.normalisation} + {self.schedule}{cost}{kept}"
        blocks = ",".join(map(str, self.blocks_removed)) if self.blocks_removed else "none"
        share = "" if self.depth_share is None else f", depth share {self.depth_share:g}"
        return f"blocks by {self.block_score} (removed {blocks}){share}"


class Member(BaseModel):
    """One model a job made: a family's member at its target (a plain job has one)."""

    target: dict[str, float]  # {"macs": 0.5}
    macs_after: int
    params_after: int
    after_pruning: Metrics
    after_finetune: Metrics | None
    widths: dict[str, int]  # output channels per group root (depth: block count)
    target_met: bool
    exports: dict[str, ExportChecks]  # by format
    # a search's candidates for this member (a family searches at each target)
    candidates: list[Candidate] | None = Field(default=None, exclude_if=_unset)


class JobResult(BaseModel):
    """A succeeded job: before and after, how it got there, and what it wrote."""

    before: Metrics
    # after a search (`candidates`), the chosen candidate after its short recovery
    after_pruning: Metrics
    after_finetune: Metrics | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    # every target reached (a job that misses one fails as `target_unreachable` instead)
    target_met: bool
    sparsity: float | None  # unstructured and 2:4: the fraction of eligible weights zeroed
    # MACs and latency refer to one row of these shapes
    example_inputs: dict[str, list[int]]
    # what the `hf` output's config states differently (per-layer lists included)
    config_updates: dict[str, Any]
    widths: dict[str, int]
    steps: list[Step]
    evaluated_on: Literal["held_out", "calibration"]
    # rows per scoring pass: fewer than batch_size when a batch would not fit in memory
    micro_batch_rows: int
    exports: dict[str, ExportChecks]
    seconds: dict[str, float]  # per stage; "score" and "recalibrate" are parts of "prune"
    family: list[Member] | None = Field(default=None, exclude_if=_unset)
    latency: Latency | None = Field(default=None, exclude_if=_unset)
    mlflow: TrackingRun | None = Field(default=None, exclude_if=_unset)
    # a search's candidates in the order tried, the job's own allocation first (a family's:
    # the last member's; each member carries its own)
    candidates: list[Candidate] | None = Field(default=None, exclude_if=_unset)

    @property
    def searches(self) -> list[tuple[str, list[Candidate]]]:
        """Each search the job ran, with what it searched for: a family's members by target
        ("macs 0.75"), or the job's one search (""); none without a search."""
        if self.family:
            return [
                (", ".join(f"{k} {v:g}" for k, v in m.target.items()), m.candidates)
                for m in self.family
                if m.candidates
            ]
        return [("", self.candidates)] if self.candidates else []

    @property
    def members(self) -> list[Member]:
        """The models the job made: a family's members, or the one model."""
        if self.family:
            return self.family
        return [
            Member(
                target={},
                macs_after=self.macs_after,
                params_after=self.params_after,
                after_pruning=self.after_pruning,
                after_finetune=self.after_finetune,
                widths=self.widths,
                target_met=self.target_met,
                exports=self.exports,
            )
        ]


class Progress(BaseModel):
    """Where a running job is: its stage and how far through it (empty while queued)."""

    stage: str | None = Field(default=None, exclude_if=_unset)
    percent: float | None = Field(default=None, exclude_if=_unset)
    step: int | None = Field(default=None, exclude_if=_unset)  # pruning: step of total
    total: int | None = Field(default=None, exclude_if=_unset)
    macs: int | None = Field(default=None, exclude_if=_unset)
    params: int | None = Field(default=None, exclude_if=_unset)
    epoch: int | None = Field(default=None, exclude_if=_unset)  # fine-tuning: epoch of epochs
    epochs: int | None = Field(default=None, exclude_if=_unset)
    format: str | None = Field(default=None, exclude_if=_unset)  # exporting: which output
    target: dict[str, float] | None = Field(default=None, exclude_if=_unset)  # a member's
    # searching: candidate of candidates
    candidate: int | None = Field(default=None, exclude_if=_unset)
    candidates: int | None = Field(default=None, exclude_if=_unset)
