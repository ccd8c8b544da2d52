"""What the engine knows about model families: attention layers, which groups a Hugging Face
config can describe, and keeping head counts and widths in modules and configs in step with the
weights.

Duck-typed on module attributes, with the config fields and module names of each family from
`families` (a description per `model_type`): the engine never imports `transformers`.
"""

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine.cost import run_forward
from worker.engine.errors import InvalidConfig
from worker.engine.expert_count import expert_counts
from worker.engine.experts import expert_layers
from worker.engine.families import FfnWidth, family_of
from worker.engine.fused_ffn import fused_ffn_layers
from worker.engine.groups import ChannelGroup, weight_axis
from worker.engine.head_dims import head_dim_layers
from worker.engine.kv_groups import GroupedAttention


@dataclass(frozen=True)
class AttentionLayer:
    owner: Any  # the module whose forward splits heads (its head-count attributes get updated)
    projections: tuple[nn.Linear, ...]  # query, key, value: output channels are head channels
    head_dim: int

    @property
    def heads(self) -> int:
        return self.projections[0].out_features // self.head_dim


def attention_layers(
    model: nn.Module, explicit: Mapping[str, int]
) -> tuple[list[AttentionLayer], list[nn.Module]]:
    """Attention layers whose heads can be pruned whole, and projections that must stay as is.

    `explicit` maps a projection's module name to its number of heads (hand-written attention).
    Fused qkv projections (GPT-2's `c_attn`) are kept whole. Grouped-query attention (fewer
    key/value heads than query heads) is frozen here, out of Torch-Pruning's reach: `kv_groups`
    prunes it by whole key/value groups. So is attention whose heads must stay (`_heads_stay`).
    """
    named = dict(model.named_modules())
    layers: list[AttentionLayer] = []
    frozen: list[nn.Module] = []
    module: Any
    for module in model.modules():
        if _all_linear(module, "query", "key", "value") and hasattr(module, "attention_head_size"):
            layers.append(
                AttentionLayer(
                    module,
                    (module.query, module.key, module.value),
                    int(module.attention_head_size),
                )
            )
        elif _all_linear(module, "q_proj", "k_proj", "v_proj") and hasattr(module, "head_dim"):
            projections = (module.q_proj, module.k_proj, module.v_proj)
            if getattr(module, "num_key_value_groups", 1) == 1 and not _heads_stay(module):
                layers.append(AttentionLayer(module, projections, int(module.head_dim)))
            else:
                frozen.extend(projections)
        elif hasattr(module, "c_attn"):
            frozen.append(module.c_attn)
    for name, heads in explicit.items():
        projection = named.get(name)
        if not isinstance(projection, nn.Linear):
            raise InvalidConfig(f"attention projection {name!r} is not a Linear layer of the model")
        parent = named[name.rpartition(".")[0]]
        layers.append(AttentionLayer(parent, (projection,), projection.out_features // heads))
    return layers, frozen


def _heads_stay(attention: nn.Module) -> bool:
    """Attention whose q, k and v projections stay out of Torch-Pruning's graph, heads whole:
    - Phi's and StableLM's rotate the first `rotary_ndims` dimensions of each head and
      concatenate the rest back; the dependency search through those slices and concatenations
      does not end in useful time (over 25 minutes on a 2-layer, 4-head Phi);
    - Swin's adds a relative position bias with one column per head, a table outside the
      graph: removing a head would leave its column behind and break the forward pass."""
    rotated = getattr(attention, "rotary_ndims", None)
    partial_rotary = isinstance(rotated, int) and rotated < int(
        getattr(attention, "head_dim", rotated)
    )
    per_head_bias = any(
        name.endswith("relative_position_bias_table") for name, _ in attention.named_parameters()
    )
    return partial_rotary or per_head_bias


def _all_linear(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def head_dims(layers: list[AttentionLayer]) -> dict[nn.Module, int]:
    return {p: layer.head_dim for layer in layers for p in layer.projections}


def is_transformer(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "num_attention_heads")


def config_describes_head_size(model: nn.Module) -> bool:
    """True when the class reads the head size from `head_dim`, so a config can describe fewer
    heads of the same size: as its family says, else when the config states `head_dim`.

    BERT, ViT and GPT-2 derive the head size from hidden_size / num_attention_heads: a config
    cannot express pruned heads for them, so uniform (config-describable) pruning keeps heads.
    """
    config = getattr(model, "config", None)
    head_size = family_of(config).head_size
    if head_size == "auto":
        return getattr(config, "head_dim", None) is not None
    return head_size == "head_dim"


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """A transformer's token (or patch) embedding module, if it names one."""
    getter: Any = getattr(model, "get_input_embeddings", None)
    if not is_transformer(model) or not callable(getter):
        return None
    try:
        found = getter()
    except (NotImplementedError, AttributeError):  # transformers' default raises for some models
        return None
    return found if isinstance(found, nn.Module) else None


def is_residual_stream(group: ChannelGroup) -> bool:
    """The group whose members include the input embeddings: a transformer's hidden size."""
    return any(isinstance(m, nn.Embedding) for m, is_out, _, _ in group.members if is_out)


def hidden_size_problem(model: nn.Module, example_inputs: Any) -> str | None:
    """Why the residual stream of `model` cannot be pruned into a config that states it, or None.

    The config must state `head_dim` apart from `hidden_size` (else the head size is derived from
    it), and the forward pass must not read `config.hidden_size` itself (Gemma scales its
    embeddings by √hidden_size: pruning would change the function). Checked by running the model
    with the attribute changed.
    """
    config: Any = getattr(model, "config", None)
    family = family_of(config)
    if family.hidden_stays is not None:
        return family.hidden_stays
    describes = config_describes_head_size(model) or family.hidden_with_head_size
    if not is_transformer(model) or not describes:
        return "its config derives the head size from hidden_size"
    if not isinstance(getattr(config, "hidden_size", None), int):
        return "its config states no hidden_size"
    embeddings = input_embeddings(model)
    if getattr(embeddings, "scalar_embed_scale", None) is not None:
        return "its embeddings are scaled by a function of hidden_size (Gemma)"
    if any(_scales_embeddings(m) for m in model.modules()):
        return "its embeddings are scaled by √hidden_size (scale_embedding)"
    with torch.no_grad():
        reference = next(_tensors(run_forward(model, example_inputs)))
        config.hidden_size += 1
        try:
            changed = next(_tensors(run_forward(model, example_inputs)))
        except Exception:  # a forward that breaks on it certainly reads it
            return "its forward pass reads config.hidden_size"
        finally:
            config.hidden_size -= 1
    if not torch.equal(reference, changed):
        return "its forward pass reads config.hidden_size"
    return None


def unstated_widths(model: nn.Module, example_inputs: Any) -> str | None:
    """Why a config cannot state widths that per-layer pruning moves in `model`, in words: an
    FFN width its class fixes (`fixed_ffn_layers`), a hidden size that stays
    (`hidden_size_problem`); None when neither."""
    reasons = []
    if fixed_ffn_layers(model):
        fixed = family_of(getattr(model, "config", None)).fixed_ffn
        reasons.append(f"{type(model).__name__} builds its FFN at {fixed} whatever the config says")
    if is_transformer(model):
        reasons += filter(None, [hidden_size_problem(model, example_inputs)])
    return ", and ".join(reasons) or None


def _scales_embeddings(module: nn.Module) -> bool:
    """BART's and Marian's `embed_scale`: √d_model with `scale_embedding`, which the class
    computes from the config on reload."""
    scale = getattr(module, "embed_scale", None)
    return isinstance(scale, float) and scale != 1.0


def hidden_size_multiple(model: nn.Module) -> int:
    """transformers' configs require hidden_size to stay a multiple of the attention heads."""
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    return heads if isinstance(heads, int) and heads > 0 else 1


def ffn_layers(model: nn.Module) -> dict[nn.Module, FfnWidth]:
    """A transformer's FFN up-projections whose width its config states, each with the field
    that states it, in module order: the up-projections its family names (`families`), under
    the first of its fields whose scope holds them and which the config has."""
    config = getattr(model, "config", None)
    if not is_transformer(model):
        return {}
    family = family_of(config)
    fused = {f.up for f in fused_ffn_layers(model)}
    found: dict[nn.Module, FfnWidth] = {}
    for name, module in model.named_modules():
        named = _ends_with(name, family.up_projections) or module in fused
        if weight_axis(module, True) is None or not named:
            continue
        parts = name.split(".")
        stated = [f for f in family.ffn if f.scope in ("", *parts) and hasattr(config, f.field)]
        if stated:
            found[module] = stated[0]
    return found


def fixed_ffn_layers(model: nn.Module) -> list[nn.Module]:
    """A transformer's FFN up-projections whose width its class fixes (`Family.fixed_ffn`:
    BLOOM's 4 × hidden_size): no config states a narrower one, so only per-layer widths
    prune them."""
    family = family_of(getattr(model, "config", None))
    if not is_transformer(model) or family.fixed_ffn is None:
        return []
    return [
        module
        for name, module in model.named_modules()
        if _ends_with(name, family.up_projections) and weight_axis(module, True) is not None
    ]


def _ends_with(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def group_filter(
    model: nn.Module, hidden_size: bool, per_layer: bool = False
) -> Callable[[ChannelGroup], bool]:
    """Hugging Face transformers: attention heads, FFN neurons whose width the config states
    (routed experts' too, and how many experts a layer has) or, with `per_layer` widths (which
    no config states), whose width the class fixes, head sizes the config states (`head_dims`)
    and, when `hidden_size`, the residual stream (the group whose members include the input
    embeddings)."""
    if not is_transformer(model):
        return lambda group: True
    ffn = set(ffn_layers(model)) | set(fixed_ffn_layers(model) if per_layer else ())
    outside = {e.module for e in expert_layers(model)} if states_expert_width(model) else set()
    if states_expert_count(model):
        outside |= {c.router for c in expert_counts(model)}
    if states_head_dim(model):
        outside |= {h.projections[0] for h in head_dim_layers(model)}
    if hidden_size and family_of(getattr(model, "config", None)).hidden_with_head_size:
        outside |= {h.projections[3] for h in head_dim_layers(model)}  # `derived_hidden`

    def allowed(group: ChannelGroup) -> bool:
        if is_residual_stream(group):
            return hidden_size
        if group.unit > 1 or group.root in outside:
            return True
        return any(is_out and m in ffn for m, is_out, _, _ in group.members)

    return allowed


def kept_multiple(model: nn.Module) -> Callable[[ChannelGroup], int]:
    """What a group's kept width must stay a multiple of for the config to state it: the head
    count for the hidden size, the hidden size for an FFN whose config states an integer ratio
    of it (DINOv2's `mlp_ratio`), else 1. Decided on the model as it comes."""
    heads = hidden_size_multiple(model)
    ratios = {m: _in_width(m) for m, stated in ffn_layers(model).items() if stated.integral}

    def multiple(group: ChannelGroup) -> int:
        if is_residual_stream(group):
            return heads
        return max((ratios.get(m, 1) for m, is_out, _, _ in group.members if is_out), default=1)

    return multiple


def output_layers(model: nn.Module, example_inputs: Any) -> list[nn.Module]:
    """Leaf modules whose output is (a view of) a model output: their channels are the contract."""
    produced: dict[int, nn.Module] = {}
    # Every recorded output stays alive until the end: a freed one's address could be reused by
    # a model output that no leaf produced (Gemma 2's soft-capped logits), which would then name
    # an inner layer (an FFN projection, left unpruned) as an output layer.
    alive: list[Tensor] = []

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            produced[output.data_ptr()] = module
            alive.append(output)

    handles = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            outputs = run_forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [produced[t.data_ptr()] for t in _tensors(outputs) if t.data_ptr() in produced]


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def set_head_count(owner: Any, heads: int, head_dim: int | None) -> None:
    """Write a head count into the attributes attention modules split their inputs by."""
    for attribute in ("num_attention_heads", "num_heads"):
        if isinstance(getattr(owner, attribute, None), int):
            setattr(owner, attribute, heads)
    if isinstance(getattr(owner, "all_head_size", None), int) and head_dim is not None:
        owner.all_head_size = heads * head_dim


def sync_structure(
    model: nn.Module, layers: list[AttentionLayer], grouped: Iterable[GroupedAttention] = ()
) -> dict[str, Any]:
    """Write the pruned head counts into attention modules, and uniform widths into the config.

    Returns what was written to the config.
    """
    for layer in layers:
        set_head_count(layer.owner, layer.heads, layer.head_dim)
    config = getattr(model, "config", None)
    written: dict[str, Any] = {}
    if config is None:
        return written
    head_counts = {layer.heads for layer in layers}
    if len(head_counts) == 1 and is_transformer(model):
        written["num_attention_heads"] = head_counts.pop()
        if getattr(config, "num_key_value_heads", None) is not None:
            written["num_key_value_heads"] = written["num_attention_heads"]
        if family_of(config).head_size == "head_dim":  # the class reads it, stated or not
            written["head_dim"] = layers[0].head_dim
    grouped_counts = {(layer.heads, layer.kv_heads) for layer in grouped}
    if len(grouped_counts) == 1:
        written["num_attention_heads"], written["num_key_value_heads"] = grouped_counts.pop()
    embeddings = input_embeddings(model)
    hidden = getattr(embeddings, "embedding_dim", None)
    if (
        is_transformer(model)
        and family_of(config).hidden_stays is None
        and isinstance(hidden, int)
        and hidden != config.hidden_size
    ):
        written["hidden_size"] = hidden
    tie: Any = getattr(model, "tie_weights", None)
    if getattr(config, "tie_word_embeddings", False) and callable(tie):
        tie()  # pruning replaced the shared weight by two equal copies
    written.update(_ffn_fields(model))
    head_sizes = {h.head_dim for h in head_dim_layers(model)}
    if states_head_dim(model) and len(head_sizes) == 1:
        written[str(family_of(config).head_dim)] = head_sizes.pop()
    expert_widths = {e.width for e in expert_layers(model)}
    if states_expert_width(model) and len(expert_widths) == 1:
        written[str(family_of(config).experts_width)] = expert_widths.pop()
    written.update(_expert_count(model))
    if not is_transformer(model) and isinstance(getattr(config, "hidden_sizes", None), list):
        written.update(_stage_widths(model, len(config.hidden_sizes)))
    for attribute, value in written.items():
        setattr(config, attribute, value)
    return written


def states_expert_width(model: nn.Module) -> bool:
    """Whether the config states the width of every routed expert (`families`)."""
    config = getattr(model, "config", None)
    field = family_of(config).experts_width
    return field is not None and hasattr(config, field)


def states_expert_count(model: nn.Module) -> bool:
    """Whether the config states how many routed experts every layer has (`families`)."""
    config = getattr(model, "config", None)
    field = family_of(config).experts_count
    return field is not None and hasattr(config, field)


def _expert_count(model: nn.Module) -> dict[str, Any]:
    """The experts every layer keeps, where they all keep as many and fewer than the config
    says; the model's own count follows (its load-balancing loss reads it)."""
    if not states_expert_count(model):
        return {}
    config = getattr(model, "config", None)
    field = str(family_of(config).experts_count)
    counts = {c.count for c in expert_counts(model)}
    if len(counts) != 1 or counts == {getattr(config, field)}:
        return {}
    count = counts.pop()
    owner: Any = model
    if isinstance(getattr(owner, "num_experts", None), int):
        owner.num_experts = count
    return {field: count}


def describes_stage_widths(model: nn.Module) -> bool:
    """Hugging Face CNNs (ResNet, ConvNeXt) state one width per stage: `hidden_sizes`."""
    config = getattr(model, "config", None)
    return not is_transformer(model) and isinstance(getattr(config, "hidden_sizes", None), list)


def states_head_dim(model: nn.Module) -> bool:
    """Whether the config states every head's size apart from the hidden size (T5's `d_kv`)."""
    return family_of(getattr(model, "config", None)).head_dim is not None


def states_width_multiplier(model: nn.Module) -> bool:
    """CNNs whose config scales every width by one number (MobileNetV2, EfficientNet)."""
    return family_of(getattr(model, "config", None)).width_multiplier is not None


def _stage_widths(model: nn.Module, stages: int) -> dict[str, Any]:
    """`hidden_sizes` from each stage's last layer and `embedding_size` from the stem.

    With uniform pruning in exact steps, inner widths stay the fixed multiples the architecture
    derives from these (a basic block's = the stage's, ConvNeXt's MLP = 4×)."""
    last: dict[int, int] = {}
    stem: int | None = None
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or not isinstance(weight, Tensor):
            continue
        stem = int(weight.shape[0]) if stem is None else stem
        for stage in range(stages):
            if f"stages.{stage}." in name:
                last[stage] = int(weight.shape[0])
    written: dict[str, Any] = {"hidden_sizes": [last[i] for i in range(stages)]}
    if stem is not None and hasattr(getattr(model, "config", None), "embedding_size"):
        written["embedding_size"] = stem
    return written


def _ffn_fields(model: nn.Module) -> dict[str, Any]:
    """Each FFN field whose layers share one width (or one ratio of their hidden size)."""
    layers: dict[FfnWidth, list[tuple[int, int]]] = {}  # field: (width, hidden) per layer
    for (module, stated), width in zip(ffn_layers(model).items(), _ffn_widths(model), strict=True):
        layers.setdefault(stated, []).append((width, _in_width(module)))
    written: dict[str, Any] = {}
    for stated, sizes in layers.items():
        value = _ratio(sizes, stated.integral) if stated.ratio else _one_width(sizes)
        if value is not None:
            written[stated.field] = value
    return written


def _one_width(sizes: list[tuple[int, int]]) -> int | None:
    widths = {width for width, _ in sizes}
    return widths.pop() if len(widths) == 1 else None


def _ratio(sizes: list[tuple[int, int]], integral: bool) -> float | None:
    """The ratio r from which the class builds every (width, hidden) layer back exactly,
    int(hidden × r) = width, or None if they share none (or, `integral`, none that is whole)."""
    width, hidden = sizes[0]
    ratio: float
    if integral:
        ratio = width // hidden
    else:
        ratio = width / hidden
        if int(hidden * ratio) < width:  # the quotient was rounded down: the next float is exact
            ratio = math.nextafter(ratio, math.inf)
    return ratio if all(int(h * ratio) == w for w, h in sizes) else None


def _ffn_widths(model: nn.Module) -> Iterator[int]:
    """Current widths of the FFN up-projections, in the order of `ffn_layers` (a fused gate and
    up projection holds two rows a neuron)."""
    fused = {f.up for f in fused_ffn_layers(model)}
    for module in ffn_layers(model):
        yield _width(module, is_out=True) // (2 if module in fused else 1)


def _in_width(module: nn.Module) -> int:
    return _width(module, is_out=False)


def _width(module: nn.Module, is_out: bool) -> int:
    axis = weight_axis(module, is_out)
    weight = getattr(module, "weight", None)
    assert axis is not None and isinstance(weight, Tensor)
    return int(weight.shape[axis])
