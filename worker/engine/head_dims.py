"""The size of every head of an attention layer, where the config states it apart from the
hidden size and the heads must stay (T5's `d_kv`: each stack's first layer holds a relative
position bias with one column per head, and `num_heads` is one number for every layer).

Channel c = h·d + j of the q, k and v projections (and column c of o) is dimension j of head
h. Attention is q_h · k_h summed over the head's dimensions and v_h mixed into o, so removing
dimension j of head h from all four removes one term and leaves the rest of the function as it
is (T5 scales no logits by the head size). Unit r of a layer is the r-th least important
dimension of *every* head (OBA channel scores, ranked within each head), so removing k units
leaves each head its d − k best dimensions: one size, which the config states. Torch-Pruning
cannot keep the heads equal, so these layers stay out of its graph (as `experts` do) and the
plan records each head's removed dimensions (`head_dim_removals`).

BART-style attention (`ScaledHeadDims`: BART, mBART, Marian, Whisper) derives its head size
from the hidden size, so its heads shrink only with it (`derived_hidden`), and it scales the
logits by head_size^-0.5: the change of scale is folded into the query projection, so the
module computes the same function once its head size says the new one. BLOOM's attention
(`FusedHeadDims`) is the same with q, k and v in one projection.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from worker.engine.groups import ChannelGroup, keep_channels_
from worker.engine.ranked import rank_rows, take_ranks


@dataclass(eq=False)
class HeadDims:
    owner: Any  # the attention module: q, k, v, o, n_heads, key_value_proj_dim, inner_dim
    # order[h] lists head h's dimensions from least to most important, as last scored
    order: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def heads(self) -> int:
        return int(self.owner.n_heads)

    @property
    def head_dim(self) -> int:
        return int(self.owner.key_value_proj_dim)

    @property
    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        return self.owner.q, self.owner.k, self.owner.v, self.owner.o

    def channel_group(self, name: str) -> ChannelGroup:
        """Root channel r: the r-th ranked dimension of every head (scored by `rank_`)."""
        return ChannelGroup(
            name, self.projections[0], None, self.head_dim, 1, [], 1, self.rank_, self.costs
        )

    def rank_(self, element_scores: dict[nn.Parameter, Tensor], method: str) -> Tensor:
        """Per rank r, the sum over heads of their r-th lowest dimension score; remembers each
        head's order for `remove_`. A dimension's score is the OBA channel score averaged over
        its q, k and v rows and its o column."""
        q, k, v, o = (cast(nn.Parameter, p.weight) for p in self.projections)
        if not all(w in element_scores for w in (q, k, v, o)):
            self.order = torch.arange(self.head_dim).repeat(self.heads, 1)
            return torch.zeros(self.head_dim, dtype=torch.float64)
        rows = [_per_channel(element_scores[w], method) for w in (q, k, v)]
        columns = _per_channel(element_scores[o].t(), method)
        per_dim = ((sum(rows) + columns) / 4).view(self.heads, self.head_dim)
        scores, self.order = rank_rows(per_dim)
        return scores

    def costs(self, module_macs: Mapping[nn.Module, int], metric: str) -> Tensor:
        """What removing one rank (a dimension of every head) saves: the four projections'
        MACs over the head size (the attention products shrink too; the loop measures them),
        or their parameters."""
        q, k, v, o = self.projections
        if metric == "macs":
            saved = sum(module_macs.get(p, 0) for p in (q, k, v, o)) / self.head_dim
        else:
            saved = self.heads * (q.in_features + k.in_features + v.in_features + o.out_features)
        return torch.full((self.head_dim,), float(saved), dtype=torch.float64)

    def remove_(self, ranks: list[int]) -> list[list[int]]:
        """Remove the dimensions of ranks `ranks` from every head; returns each head's removed
        dimensions (indices among its current ones), for the plan."""
        removed, self.order = take_ranks(self.order, ranks)
        self.remove_dims_(removed)
        return removed

    def remove_dims_(self, removed: list[list[int]]) -> None:
        """Remove `removed[h]` from head h (the same count from each)."""
        d = self.head_dim
        drops = [set(drop) for drop in removed]
        kept = [h * d + j for h, drop in enumerate(drops) for j in range(d) if j not in drop]
        q, k, v, o = self.projections
        for projection in (q, k, v):
            keep_channels_(projection, 0, kept)
        keep_channels_(o, 1, kept)
        self.resize_(d - len(removed[0]))

    def resize_(self, head_dim: int) -> None:
        """Write the new head size into the module's attributes."""
        self.owner.key_value_proj_dim = head_dim
        self.owner.inner_dim = self.heads * head_dim


@dataclass(eq=False)
class ScaledHeadDims(HeadDims):
    """BART-style attention: q_proj, k_proj, v_proj, out_proj, `num_heads`, `head_dim`,
    `embed_dim` and `scaling` = head_dim^-0.5."""

    @property
    def heads(self) -> int:
        return int(self.owner.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.owner.head_dim)

    @property
    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        owner = self.owner
        return owner.q_proj, owner.k_proj, owner.v_proj, owner.out_proj

    def resize_(self, head_dim: int) -> None:
        """Logits are scaling · q·k with scaling = head_dim^-0.5, which the class computes
        from the new size on reload: q scaled by old / new scaling = √(new / old) keeps them."""
        owner, q = self.owner, self.owner.q_proj
        factor = math.sqrt(head_dim / self.head_dim)
        with torch.no_grad():
            q.weight.mul_(factor)
            if q.bias is not None:
                q.bias.mul_(factor)
        owner.head_dim = head_dim
        owner.embed_dim = self.heads * head_dim
        owner.scaling = head_dim**-0.5


@dataclass(eq=False)
class FusedHeadDims(ScaledHeadDims):
    """BLOOM's attention: `query_key_value` laid out head by head, each head's query, key and
    value dimensions in turn (row (h·3 + part)·d + j), `dense` out, `num_heads`, `head_dim`
    and `inv_norm_factor` = head_dim^-0.5, the logits' scale (ALiBi's slopes depend on the
    head count only)."""

    @property
    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        fused = self.owner.query_key_value
        return fused, fused, fused, self.owner.dense

    def rank_(self, element_scores: dict[nn.Parameter, Tensor], method: str) -> Tensor:
        """As `HeadDims.rank_`, with the q, k and v rows of a dimension read from the fused
        projection."""
        fused, _, _, dense = (cast(nn.Parameter, p.weight) for p in self.projections)
        if fused not in element_scores or dense not in element_scores:
            self.order = torch.arange(self.head_dim).repeat(self.heads, 1)
            return torch.zeros(self.head_dim, dtype=torch.float64)
        rows = _per_channel(element_scores[fused], method).view(self.heads, 3, self.head_dim)
        columns = _per_channel(element_scores[dense].t(), method).view(self.heads, -1)
        scores, self.order = rank_rows((rows.sum(1) + columns) / 4)
        return scores

    def costs(self, module_macs: Mapping[nn.Module, int], metric: str) -> Tensor:
        fused, _, _, dense = self.projections
        if metric == "macs":
            saved = (module_macs.get(fused, 0) + module_macs.get(dense, 0)) / self.head_dim
        else:
            saved = self.heads * (3 * fused.in_features + dense.out_features)
        return torch.full((self.head_dim,), float(saved), dtype=torch.float64)

    def remove_dims_(self, removed: list[list[int]]) -> None:
        d = self.head_dim
        drops = [set(drop) for drop in removed]
        kept = [[j for j in range(d) if j not in drop] for drop in drops]
        rows = [
            (h * 3 + part) * d + j for h in range(self.heads) for part in range(3) for j in kept[h]
        ]
        fused, _, _, dense = self.projections
        keep_channels_(fused, 0, rows)
        keep_channels_(dense, 1, [h * d + j for h in range(self.heads) for j in kept[h]])
        self.resize_(d - len(removed[0]))

    def resize_(self, head_dim: int) -> None:
        """Fold √(new / old) into every head's query rows (weights and bias), as
        `ScaledHeadDims` does, and write the new size."""
        owner = self.owner
        fused = owner.query_key_value
        queries = [h * 3 * head_dim + j for h in range(self.heads) for j in range(head_dim)]
        factor = math.sqrt(head_dim / self.head_dim)
        with torch.no_grad():
            fused.weight[queries] *= factor
            if fused.bias is not None:
                fused.bias[queries] *= factor
        owner.head_dim = head_dim
        owner.hidden_size = owner.split_size = self.heads * head_dim
        owner.inv_norm_factor = head_dim**-0.5


def head_dim_layers(model: nn.Module) -> list[HeadDims]:
    """Attention modules where every head has the same removable dimensions: T5's (q, k, v,
    o projections, `n_heads` and `key_value_proj_dim`), BART's (`ScaledHeadDims`) and BLOOM's
    (`FusedHeadDims`, told from Falcon's, whose rotary embeddings read the head size, by the
    `pretraining_tp` only BLOOM has)."""
    found: list[HeadDims] = []
    for module in model.modules():
        if _has(module, nn.Linear, "q", "k", "v", "o") and _has(
            module, int, "n_heads", "key_value_proj_dim"
        ):
            found.append(HeadDims(module))
        elif (
            _has(module, nn.Linear, "q_proj", "k_proj", "v_proj", "out_proj")
            and _has(module, int, "num_heads", "head_dim", "embed_dim")
            and _has(module, float, "scaling")
        ):
            found.append(ScaledHeadDims(module))
        elif (
            _has(module, nn.Linear, "query_key_value", "dense")
            and _has(module, int, "num_heads", "head_dim", "split_size", "pretraining_tp")
            and _has(module, float, "inv_norm_factor")
        ):
            found.append(FusedHeadDims(module))
    return found


def _has(module: nn.Module, kind: type, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), kind) for n in names)


def _per_channel(scores: Tensor, method: str) -> Tensor:
    """(channels, inputs) → (channels,), as `groups.channel_scores` reduces a layer's rows:
    |signed sum|, or the L2 norm for magnitude."""
    scores = scores.double()
    return (scores**2).sum(1).sqrt() if method == "magnitude" else scores.sum(1).abs()
