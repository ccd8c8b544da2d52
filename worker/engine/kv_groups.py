"""Grouped-query attention (Llama, Mistral, Qwen2/3, Gemma …): whole key/value groups as units.

Under GQA each key/value head is read by `r = heads / kv_heads` query heads (query head h reads
kv head h // r, as transformers' `repeat_kv` lays them out). Removing one kv head therefore
removes its `head_dim` rows of k_proj and v_proj, the r·head_dim rows of q_proj of its query
heads, and the matching input columns of o_proj — one unit, scored together. The ratio r stays
the same, so `num_attention_heads / num_key_value_heads` stays integral and a config states it.

Torch-Pruning's dependency tracer does not terminate on these projections (the repeat_kv expand
couples widths of different sizes), so the unit is defined and removed here, outside its graph.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from worker.engine.groups import ChannelGroup


@dataclass(frozen=True)
class GroupedAttention:
    owner: Any  # the attention module (its `head_dim` and `num_key_value_groups` stay valid)
    q: Any  # nn.Linear, each of the four
    k: Any
    v: Any
    o: Any
    head_dim: int

    @property
    def kv_heads(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def queries_per_group(self) -> int:
        return self.q.out_features // self.k.out_features


def grouped_attention_layers(model: nn.Module) -> list[GroupedAttention]:
    """Attention modules with separate q/k/v/o projections and fewer kv heads than heads."""
    layers = []
    for module in model.modules():
        projections: list[Any] = [
            getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        ]
        head_dim = getattr(module, "head_dim", None)
        if not all(isinstance(p, nn.Linear) for p in projections) or not isinstance(head_dim, int):
            continue
        q, k, v, o = projections
        if q.out_features > k.out_features and q.out_features % k.out_features == 0:
            layers.append(GroupedAttention(module, q, k, v, o, head_dim))
    return layers


def kv_channel_group(layer: GroupedAttention, name: str) -> ChannelGroup:
    """The layer's kv groups as a ChannelGroup rooted at k_proj: root channel c of kv head g
    (c = g·head_dim + j) collects channel j of every query head reading g, in q_proj and o_proj."""
    d, r = layer.head_dim, layer.queries_per_group
    kv_channels = list(range(layer.k.out_features))
    query_channels = list(range(layer.q.out_features))
    # query channel c = h·d + j belongs to head h, which reads kv head h // r
    query_roots = [(c // d // r) * d + c % d for c in query_channels]
    members: list[tuple[nn.Module, bool, list[int], list[int]]] = [
        (layer.k, True, kv_channels, kv_channels),
        (layer.v, True, kv_channels, kv_channels),
        (layer.q, True, query_channels, query_roots),
        (layer.o, False, query_channels, query_roots),
    ]
    return ChannelGroup(name, layer.k, None, layer.k.out_features, d, members)


def remove_kv_groups_(layer: GroupedAttention, groups: list[int]) -> None:
    """Remove kv heads `groups` (indices among the current kv heads) and their query heads."""
    d, r = layer.head_dim, layer.queries_per_group
    drop = set(groups)
    kept_kv = [g for g in range(layer.kv_heads) if g not in drop]
    kv_rows = [g * d + j for g in kept_kv for j in range(d)]
    query_rows = [(g * r + i) * d + j for g in kept_kv for i in range(r) for j in range(d)]
    for name, width, rows in (
        ("q_norm", layer.q.out_features, query_rows),
        ("k_norm", layer.k.out_features, kv_rows),
    ):
        _keep_norm_channels_(getattr(layer.owner, name, None), width, rows)
    for projection, rows in ((layer.k, kv_rows), (layer.v, kv_rows), (layer.q, query_rows)):
        _keep_rows_(projection, rows)
    _keep_columns_(layer.o, query_rows)
    for attribute in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(layer.owner, attribute, None), int):
            setattr(layer.owner, attribute, layer.heads)
    if isinstance(getattr(layer.owner, "num_key_value_heads", None), int):
        layer.owner.num_key_value_heads = layer.kv_heads


def _keep_norm_channels_(norm: nn.Module | None, width: int, rows: list[int]) -> None:
    """A query/key norm over the whole projection (OLMo 2) loses the removed channels; one over
    `head_dim` (Qwen3, Gemma 3), shared by every head, stays as it is."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.shape == (width,):
        index = torch.tensor(rows, dtype=torch.long, device=weight.device)
        norm.weight = nn.Parameter(weight.data.index_select(0, index).clone())  # type: ignore[union-attr]


def _keep_rows_(linear: nn.Linear, rows: list[int]) -> None:
    index = torch.tensor(rows, dtype=torch.long, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(0, index).clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).clone())
    linear.out_features = len(rows)


def _keep_columns_(linear: nn.Linear, columns: list[int]) -> None:
    index = torch.tensor(columns, dtype=torch.long, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(1, index).clone())
    linear.in_features = len(columns)
