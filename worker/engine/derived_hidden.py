"""The hidden size of transformers whose attention derives its head size from it (BART, mBART,
Whisper, BLOOM: `Family.hidden_with_head_size`).

The class builds every attention with head_dim = d_model / heads, so a config states a smaller
d_model only if every head of every attention (both stacks' self-attention, the decoder's
cross-attention) shrinks with it. One unit is a channel of d_model in every residual stream
(the encoder's and the decoder's share their embeddings: the same channel goes from both),
removed through Torch-Pruning's groups; kept widths stay multiples of every attention's head
count, and k channels removed take each head's k / heads least important dimensions
(`head_dims.ScaledHeadDims`, which folds the logits' new scale into the query). Heads stay.
Layers the class builds a multiple of d_model wide (`Family.hidden_wide`: BLOOM's 4 × hidden_size
FFN) lose that many of their own lowest-scored channels per channel of d_model.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from worker.engine.cost import Cost
from worker.engine.families import family_of
from worker.engine.groups import ChannelGroup, channel_costs, channel_group, channel_scores
from worker.engine.head_dims import ScaledHeadDims, head_dim_layers


@dataclass(eq=False)
class DerivedHidden:
    graph: tp.DependencyGraph
    names: dict[nn.Module, str]
    streams: list[nn.Linear]  # one attention output projection per residual stream
    attentions: list[ScaledHeadDims]
    width: int
    # Embeddings d_model wide outside the traced graph: frozen positions (Marian's sinusoids,
    # Whisper's encoder positions, read under no_grad or as a weight) and BART's `shared`,
    # which `tie_weights` ties the token embeddings to. They lose the same channels.
    untraced: list[nn.Embedding] = field(default_factory=list)
    # Layers the class builds a multiple of d_model wide (`Family.hidden_wide`): each loses
    # that many of its own lowest-scored channels per channel of d_model; their scores as last
    # computed, and the multiple
    wide: dict[nn.Module, Tensor] = field(default_factory=dict)
    multiples: dict[nn.Module, int] = field(default_factory=dict)

    def channel_group(self, name: str) -> ChannelGroup:
        """Root channel c: channel c of d_model, every kept width a multiple of every head
        count."""
        multiple = math.lcm(*(a.heads for a in self.attentions))
        root = self.streams[0]
        return ChannelGroup(name, root, None, self.width, 1, [], multiple, self.scores, self.costs)

    def _stream_groups(self) -> list[ChannelGroup]:
        every = list(range(self.width))
        return [
            channel_group(self.graph, self._pruning_group(root, every), self.names, {})
            for root in self.streams
        ]

    def _pruning_group(self, root: nn.Linear, channels: list[int]) -> Any:
        return self.graph.get_pruning_group(root, tp.prune_linear_out_channels, channels)

    def scores(self, element_scores: dict[nn.Parameter, Tensor], method: str) -> Tensor:
        """Each channel's score averaged over the streams; ranks every head's dimensions for
        `remove_`."""
        for attention in self.attentions:
            attention.rank_(element_scores, method)
        for layer in self.wide:
            self.wide[layer] = channel_scores(self._wide_group(layer), element_scores, method)
        groups = self._stream_groups()
        return torch.stack([channel_scores(g, element_scores, method) for g in groups]).mean(0)

    def _wide_group(self, layer: nn.Module) -> ChannelGroup:
        channels = list(range(len(self.wide[layer])))
        group = self.graph.get_pruning_group(layer, _out(layer), channels)
        return channel_group(self.graph, group, self.names, {})

    def costs(self, module_macs: Mapping[nn.Module, int], metric: str) -> Tensor:
        """What a channel saves in the streams, as 1 / heads of a dimension of every head of
        every attention, and as its multiple of an average channel of every wide layer."""
        cost = Cost(0, 0, module_macs)
        saved = torch.stack([channel_costs(g, cost, metric) for g in self._stream_groups()])
        heads = sum(float(a.costs(module_macs, metric)[0]) / a.heads for a in self.attentions)
        wide = sum(
            float(channel_costs(self._wide_group(layer), cost, metric).mean()) * multiple
            for layer, multiple in self.multiples.items()
        )
        return saved.sum(0) + heads + wide

    def remove_(self, channels: list[int]) -> list[tuple[ScaledHeadDims, list[list[int]]]]:
        """Remove `channels` of d_model and as many dimensions of every attention; returns each
        attention's removed dimensions per head, for the plan."""
        for root in self.streams:
            self._pruning_group(root, channels).prune()
        for layer, scores in self.wide.items():
            count = len(channels) * self.multiples[layer]
            lowest = torch.argsort(scores, stable=True)[:count].tolist()
            self.graph.get_pruning_group(layer, _out(layer), lowest).prune()
            keep = torch.ones(len(scores), dtype=torch.bool)
            keep[lowest] = False
            self.wide[layer] = scores[keep]
        for embedding in self.untraced:
            remove_embedding_channels_(embedding, channels)
        self.width -= len(channels)
        return [(a, a.remove_(list(range(len(channels) // a.heads)))) for a in self.attentions]


def remove_embedding_channels_(embedding: nn.Embedding, channels: list[int]) -> None:
    """Drop `channels` (columns) of `embedding`'s vectors: one outside the traced graph, which
    the plan records by name (`Plan.embedding_removals`)."""
    gone = set(channels)
    kept = [c for c in range(embedding.embedding_dim) if c not in gone]
    index = torch.tensor(kept, dtype=torch.long, device=embedding.weight.device)
    weight = embedding.weight
    embedding.weight = nn.Parameter(
        weight.data.index_select(1, index).clone(), requires_grad=weight.requires_grad
    )
    embedding.embedding_dim = len(kept)


def derived_hidden(
    model: nn.Module, graph: tp.DependencyGraph, names: dict[nn.Module, str]
) -> DerivedHidden | None:
    """The hidden size of `model` pruned with its attentions' head size, or None when it has no
    BART-style attention."""
    attentions = [a for a in head_dim_layers(model) if isinstance(a, ScaledHeadDims)]
    if not attentions:
        return None
    streams: list[nn.Linear] = []
    members: set[nn.Module] = set()
    for attention in attentions:
        out = attention.projections[3]
        if out in members:
            continue
        streams.append(out)
        members |= {item.dep.target.module for item in _group(graph, out)}
    width = streams[0].out_features
    untraced = [
        m
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m not in members and m.embedding_dim == width
    ]
    multiples = {
        module: multiple
        for module, name in names.items()
        for end, multiple in family_of(getattr(model, "config", None)).hidden_wide
        if name.endswith("." + end)
    }
    zeros = {m: torch.zeros(graph.get_out_channels(m), dtype=torch.float64) for m in multiples}
    return DerivedHidden(graph, names, streams, attentions, width, untraced, zeros, multiples)


def _out(layer: nn.Module) -> Any:
    """Torch-Pruning's out-channel pruning function for `layer`."""
    return (
        tp.prune_conv_out_channels if isinstance(layer, nn.Conv1d) else tp.prune_linear_out_channels
    )


def _group(graph: tp.DependencyGraph, root: nn.Linear) -> Any:
    return graph.get_pruning_group(root, tp.prune_linear_out_channels, [0])
