"""The one configuration object of a pruning run."""

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from torch import nn

from worker.engine.allocation import allocation_names
from worker.engine.errors import InvalidConfig
from worker.engine.scores import scoring_methods

Granularity = Literal["channel", "layer", "unstructured", "2:4"]
TargetMetric = Literal["macs", "params", "sparsity"]
Schedule = Literal["exponential", "linear"]
BlockScore = Literal["loss", "influence"]
FinetuneFn = Callable[[nn.Module, int], None]


@dataclass(frozen=True)
class PruneConfig:
    """How to prune: plain data (`to_dict` / `from_dict` round-trip through JSON); what is called
    back (progress, fine-tuning between steps) is passed to `prune_` as arguments.

    `target` is the fraction of `target_metric` to keep for `macs` / `params` (0.5 = half the
    MACs), and the fraction of weights to zero for `sparsity` (unstructured only; `2:4` is
    always 50% of the eligible weights).
    """

    method: str = "oba"
    granularity: Granularity = "channel"
    target_metric: TargetMetric = "macs"
    target: float = 0.5
    steps: int = 10
    schedule: Schedule = "exponential"
    # Rank channels globally across groups; False keeps every group at the same kept fraction,
    # which is what a Hugging Face config (one width per kind of layer) can describe.
    global_ranking: bool = True
    ignored_layers: tuple[str, ...] = ()  # module names; their output channels are never pruned
    round_to: int | None = None  # keep channel counts at multiples of this
    prune_heads: bool = True  # prune attention heads whole (query/key/value/output together)
    # Transformers: prune the residual stream (embedding channels, every norm and every projection
    # reading or writing it) as one group. None: wherever the config states head_dim apart from
    # hidden_size and the model's forward does not read hidden_size itself.
    hidden_size: bool | None = None
    # Share (in log space) of the target's reduction taken by removing whole transformer blocks
    # first; widths take the rest. 0: widths only; granularity "layer" is depth only.
    depth_share: float = 0.0
    # How whole blocks are chosen: "loss", the second-order loss change of removing each (the
    # least now goes first); "influence", ShortGPT's block influence 1 − cos(input, output)
    # (Men et al. 2024), which costs more now and recovers better after distillation on the
    # tiny LLM (docs/benchmarks/tiny-llm.md). A search tries both (`worker/pipeline/search.py`).
    block_score: BlockScore = "loss"
    # Hand-written attention: projection module name -> number of heads. Hugging Face attention
    # layers are recognised without it.
    attention_heads: Mapping[str, int] = field(default_factory=dict, compare=False)
    # The three allocation safeguards (docs/decisions/0004-allocation-safeguards-on-by-default.md):
    cost_aware: bool = True  # rank by score per MAC (or parameter) a channel costs
    # The allocation rule (`allocation`): how a group's channel scores are made comparable with
    # other groups' before the ranking. "max" divides by the group's largest; "lamp" divides
    # each by the sum of the scores at least as large in its group (LAMP's layer-adaptive
    # normaliser, Lee et al. 2021), which spreads removal more evenly and fine-tunes better at
    # 2× (docs/decisions/0007-lamp-normaliser-as-an-option.md); `register_allocation` adds others.
    normalisation: str = "max"
    layer_floor: float = 0.1  # no group keeps fewer than this fraction of its initial width
    recalibrate_batchnorm: bool = True  # re-estimate BatchNorm statistics after each step
    per_layer_sparsity: bool = False  # unstructured: top-k per layer instead of global
    # OBA's Hθ through the θ-specific backward of linear-in-weight layers (`theta_linear`): exact
    # and cheaper. False computes the plain Hessian-vector product along θ instead, for models
    # whose layers the shortcut was never tested on.
    theta_shortcut: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in scoring_methods():
            methods = scoring_methods()
            raise InvalidConfig(f"unknown method {self.method!r}; expected one of {methods}")
        if self.normalisation not in allocation_names():
            rules = allocation_names()
            raise InvalidConfig(
                f"unknown normalisation {self.normalisation!r}; expected one of {rules}"
            )
        if self.granularity not in get_args(Granularity):
            raise InvalidConfig(f"unknown granularity {self.granularity!r}")
        if self.schedule not in get_args(Schedule):
            raise InvalidConfig(f"unknown schedule {self.schedule!r}")
        if self.block_score not in get_args(BlockScore):
            raise InvalidConfig(f"unknown block_score {self.block_score!r}")
        if self.target_metric not in get_args(TargetMetric):
            raise InvalidConfig(f"unknown target metric {self.target_metric!r}")
        structured = self.granularity in ("channel", "layer")
        if structured and self.target_metric == "sparsity":
            raise InvalidConfig(f"{self.granularity} pruning targets 'macs' or 'params'")
        if self.granularity == "unstructured" and self.target_metric != "sparsity":
            raise InvalidConfig("unstructured pruning targets 'sparsity'")
        if not 0.0 < self.target < 1.0:
            raise InvalidConfig(f"target must lie strictly between 0 and 1, got {self.target}")
        if self.steps < 1:
            raise InvalidConfig(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.layer_floor < 1.0:
            raise InvalidConfig(f"layer_floor must lie in [0, 1), got {self.layer_floor}")
        if not 0.0 <= self.depth_share <= 1.0:
            raise InvalidConfig(f"depth_share must lie in [0, 1], got {self.depth_share}")
        if self.depth_share and self.granularity != "channel":
            raise InvalidConfig("depth_share combines depth with channel pruning")
        if self.round_to is not None and self.round_to < 1:
            raise InvalidConfig(f"round_to must be positive, got {self.round_to}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples and mappings become lists and dicts."""
        data = asdict(self)
        data["ignored_layers"] = list(self.ignored_layers)
        data["attention_heads"] = dict(self.attention_heads)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruneConfig":
        """The inverse of `to_dict`; unknown keys are refused (`InvalidConfig`)."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise InvalidConfig(f"unknown PruneConfig fields {unknown}")
        values = dict(data)
        if "ignored_layers" in values:
            values["ignored_layers"] = tuple(values["ignored_layers"])
        return cls(**values)

    @property
    def kept_fraction(self) -> float:
        """Final kept fraction of the target metric (of the weights, for sparsity)."""
        return 1.0 - self.target if self.target_metric == "sparsity" else self.target

    def step_target(self, step: int, start: float = 1.0, final: float | None = None) -> float:
        """Goal after `step` of `steps` (1-based) on the way from `start` to `final` (default:
        the kept fraction of `start`): exponential decay, as OBA, or linear."""
        end = self.kept_fraction * start if final is None else final
        progress = step / self.steps
        if self.schedule == "exponential":
            return float(start * (end / start) ** progress)
        return start - (start - end) * progress
