"""How each Hugging Face family states its prunable widths in its config: described, not guessed.

One `Family` per `config.model_type`; a family the registry does not name gets `DEFAULT`, the
names most families share. The engine prunes an FFN only where its family names both the
up-projection and the config field that states its width, so what it prunes is exactly what
the config can write back (`architectures.sync_structure`), and `from_pretrained` rebuilds it;
or, where the class fixes the width (`fixed_ffn`), with per-layer widths, which no config has to
state (global ranking: the onnx, pt2 and safetensors outputs), or with the hidden size it is a
multiple of (`hidden_wide`).

Adding a family is one entry here plus its case in `tests/worker/test_families.py`.
"""

from dataclasses import dataclass, replace
from typing import Any, Literal

HeadSize = Literal["auto", "derived", "head_dim"]


@dataclass(frozen=True)
class FfnWidth:
    """A config field stating the FFN width of the layers under `scope` (a component of their
    module names, as BART's `encoder` and `decoder`; "" for every layer)."""

    field: str
    scope: str = ""
    # The field states width / the layer's hidden size (`mlp_ratio`): the class builds
    # int(hidden × ratio) neurons, so the ratio written must give back the width exactly.
    ratio: bool = False
    # The config types the ratio as an integer (DINOv2): widths stay multiples of the hidden size.
    integral: bool = False


@dataclass(frozen=True)
class Family:
    # Fields that state FFN widths; per layer, the first whose scope matches and which the
    # config has.
    ffn: tuple[FfnWidth, ...]
    # The FFN's input projections, by the end of their module names (`fc1`, `ffn.lin1`). Their
    # output width is the FFN width whatever the layer's type (GPT-2's Conv1D stores it
    # transposed).
    up_projections: tuple[str, ...]
    # Where the class takes the head size from: "derived" from hidden_size / heads whatever the
    # config says (a config then cannot state fewer heads, nor another hidden size); "head_dim"
    # when the class reads `config.head_dim`, stated or not (fewer heads of the same size can
    # be written); "auto": `head_dim` if the config states one.
    head_size: HeadSize = "auto"
    # Why the hidden size stays, in words (None: it may move): layers outside Torch-Pruning's
    # graph read it (the routers and fused 3-D expert weights of mixtures of experts), or the
    # class rebuilds something from it that pruning cannot follow.
    hidden_stays: str | None = None
    # FFNs whose gate and up projections are one layer, chunked in two halves by the forward:
    # (fused up-projection, down-projection) attribute names of the FFN module (`fused_ffn`).
    # Their width is the field of `ffn` too.
    fused_ffn: tuple[tuple[str, str], ...] = ()
    # The config field stating every routed expert's width (`experts`); None: experts stay.
    experts_width: str | None = None
    # The config field stating how many routed experts every layer has (`expert_count`); None:
    # whole experts stay.
    experts_count: str | None = None
    # An encoder-decoder whose forward shifts `input_ids` into decoder inputs when it gets
    # none (BART); others (T5, Marian, Whisper) need `decoder_input_ids` in the dataset.
    shifts_decoder_inputs: bool = False
    # A CNN whose config scales every width by this one field (`width_multiplier`): its widths
    # are those the class builds at a smaller value. `stated_widths`: fields that state one
    # layer's output channels outright, (field, end of the layer's module name).
    # The config field stating every head's size where heads stay but their size can move
    # alone (T5's `d_kv`; `head_dims`); None: head sizes stay.
    head_dim: str | None = None
    # The hidden size moves with every head's size, heads kept, so that hidden = heads × head
    # size stays what the class derives (`derived_hidden`; with uniform widths only)
    hidden_with_head_size: bool = False
    # Layers (by the end of their module names) whose output width the class builds as a
    # multiple of the hidden size (Whisper's first convolution: 1; BLOOM's FFN: 4), with that
    # multiple: they lose as many channels per channel of the hidden size
    hidden_wide: tuple[tuple[str, int], ...] = ()
    width_multiplier: str | None = None
    stated_widths: tuple[tuple[str, str], ...] = ()
    # The FFN width the class builds whatever the config says, in words (BLOOM's
    # "4 × hidden_size"): no field states another, so its `up_projections` are pruned alone
    # with per-layer widths only; an `hf` output narrows them with the hidden size
    # (`hidden_wide`) or keeps them. None: `ffn` states the width.
    fixed_ffn: str | None = None


DEFAULT = Family(
    ffn=(FfnWidth("intermediate_size"), FfnWidth("n_inner")),
    up_projections=("up_proj", "c_fc", "fc1", "intermediate.dense"),
)

# Encoder-decoders whose stacks each state their own width (Marian, Whisper; BART, mBART);
# `d_model` moves with the size of every head
_SEQ2SEQ = Family(
    (FfnWidth("encoder_ffn_dim", "encoder"), FfnWidth("decoder_ffn_dim", "decoder")),
    ("fc1",),
    head_size="derived",
    hidden_with_head_size=True,
)
_BART = replace(_SEQ2SEQ, shifts_decoder_inputs=True)
# Marian's sinusoidal positions are not saved but computed from d_model on reload: pruned
# columns would be others, so its hidden size stays
_MARIAN = replace(
    _SEQ2SEQ,
    hidden_with_head_size=False,
    hidden_stays="its sinusoidal positions are computed from d_model when it loads, not saved",
)
# GPT-J and CodeGen: `n_inner`, read by `fc_in`
_GPTJ = Family((FfnWidth("n_inner"),), ("mlp.fc_in",), head_size="derived")
# `d_kv` states the head size apart from `d_model`: heads are kept (each stack's first layer
# has a relative position bias with one column per head) and their size moves (`head_dims`).
# Flan-T5's gated FFN reads `wi_0` and `wi_1`.
_T5 = Family(
    (FfnWidth("d_ff"),),
    ("DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1"),
    head_size="derived",
    head_dim="d_kv",
)
# Mixtures of experts with routed experts only: their fused 3-D expert weights and routers are
# outside Torch-Pruning's graph, so the hidden size they read stays; each expert's width is
# pruned by `experts`, one for all, and stated by `intermediate_size`; whole experts go with a
# parameter target (`expert_count`), as many in every layer, stated by `num_experts`
# (`num_local_experts` for Mixtral).
_EXPERTS_READ_HIDDEN = "its routed experts read the hidden size outside the dependency graph"
_ROUTED = replace(
    DEFAULT,
    hidden_stays=_EXPERTS_READ_HIDDEN,
    experts_width="intermediate_size",
    experts_count="num_experts",
)

FAMILIES: dict[str, Family] = {
    # one layer shared by every position in the stack: pruned once, its width stated once; its
    # embeddings are `embedding_size` wide, projected to the hidden size (which stays)
    "albert": Family(
        (FfnWidth("intermediate_size"),),
        ("ffn",),
        head_size="derived",
        hidden_stays="its config derives the head size from hidden_size",
    ),
    "bart": _BART,
    # the FFN is 4 × hidden_size in the class, whatever the config says; the fused
    # `query_key_value` keeps its heads (their ALiBi slopes are computed from the head count).
    # With uniform widths the hidden size moves with every head's size and each FFN loses
    # four neurons per channel of it; per-layer widths prune the FFN alone.
    "bloom": Family(
        (),
        ("mlp.dense_h_to_4h",),
        head_size="derived",
        hidden_with_head_size=True,
        hidden_wide=(("mlp.dense_h_to_4h", 4),),
        fixed_ffn="4 × hidden_size",
    ),
    "codegen": _GPTJ,
    # DINOv2's config types mlp_ratio `int`; its attention reads `head_dim` when the config has it
    "dinov2": Family(
        (FfnWidth("mlp_ratio", ratio=True, integral=True),), ("mlp.fc1",), head_size="head_dim"
    ),
    "distilbert": Family((FfnWidth("hidden_dim"),), ("ffn.lin1",), head_size="derived"),
    # EfficientNet's last convolution is `round_filters(1280)` wide; its BatchNorm and the
    # classifier read `hidden_dim`, which must say the same
    "efficientnet": Family(
        (), (), width_multiplier="width_coefficient", stated_widths=(("hidden_dim", "top_conv"),)
    ),
    # Falcon's config has a `head_dim`, but as a property: hidden_size / heads
    "falcon": Family((FfnWidth("ffn_hidden_size"),), ("mlp.dense_h_to_4h",), head_size="derived"),
    "gpt2": Family((FfnWidth("n_inner"),), ("mlp.c_fc",), head_size="derived"),
    "gptj": _GPTJ,
    "gpt_neox": Family(
        (FfnWidth("intermediate_size"),), ("mlp.dense_h_to_4h",), head_size="derived"
    ),
    "marian": _MARIAN,
    "mixtral": replace(_ROUTED, experts_count="num_local_experts"),
    "mt5": _T5,
    "mbart": _BART,
    "mobilenet_v2": Family((), (), width_multiplier="depth_multiplier"),
    "modernbert": Family(
        (FfnWidth("intermediate_size"),), (), head_size="derived", fused_ffn=(("Wi", "Wo"),)
    ),
    "olmoe": _ROUTED,
    "opt": Family((FfnWidth("ffn_dim"),), ("fc1",), head_size="derived"),
    # the shared expert's width, the dense layers' and the routed experts' (`experts`)
    "phi3": Family(
        (FfnWidth("intermediate_size"),), (), fused_ffn=(("gate_up_proj", "down_proj"),)
    ),
    "qwen2_moe": Family(
        (
            FfnWidth("shared_expert_intermediate_size", "shared_expert"),
            FfnWidth("intermediate_size"),
        ),
        ("shared_expert.up_proj", "mlp.up_proj"),
        hidden_stays=_EXPERTS_READ_HIDDEN,
        experts_width="moe_intermediate_size",
        experts_count="num_experts",
    ),
    "qwen3_moe": replace(_ROUTED, experts_width="moe_intermediate_size"),
    # one ratio for every stage: stage i is 2^i times as wide, its FFN too
    "swin": Family((FfnWidth("mlp_ratio", ratio=True),), ("mlp.fc1",), head_size="derived"),
    "t5": _T5,
    "umt5": _T5,
    "whisper": replace(_SEQ2SEQ, hidden_wide=(("encoder.conv1", 1),)),
}


def family_of(config: Any) -> Family:
    """The description of `config`'s family (`DEFAULT` when the registry does not name it)."""
    return FAMILIES.get(getattr(config, "model_type", ""), DEFAULT)
