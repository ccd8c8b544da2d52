"""How each Hugging Face family states its prunable widths in its config: described, not guessed.

One `Family` per `config.model_type`; a family the registry does not name gets `DEFAULT`, the
names most families share. The engine prunes an FFN only where its family names both the
up-projection and the config field that states its width, so what it prunes is exactly what
the config can write back (`architectures.sync_structure`), and `from_pretrained` rebuilds it.

Adding a family is one entry here plus its case in `tests/worker/test_families.py`.
"""

from dataclasses import dataclass
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


DEFAULT = Family(
    ffn=(FfnWidth("intermediate_size"), FfnWidth("n_inner")),
    up_projections=("up_proj", "c_fc", "fc1", "intermediate.dense"),
)

FAMILIES: dict[str, Family] = {
    "bart": Family(  # each stack states its own width
        (FfnWidth("encoder_ffn_dim", "encoder"), FfnWidth("decoder_ffn_dim", "decoder")),
        ("fc1",),
        head_size="derived",
    ),
    # DINOv2's config types mlp_ratio `int`; its attention reads `head_dim` when the config has it
    "dinov2": Family(
        (FfnWidth("mlp_ratio", ratio=True, integral=True),), ("mlp.fc1",), head_size="head_dim"
    ),
    "distilbert": Family((FfnWidth("hidden_dim"),), ("ffn.lin1",), head_size="derived"),
    # Falcon's config has a `head_dim`, but as a property: hidden_size / heads
    "falcon": Family((FfnWidth("ffn_hidden_size"),), ("mlp.dense_h_to_4h",), head_size="derived"),
    "gpt2": Family((FfnWidth("n_inner"),), ("mlp.c_fc",), head_size="derived"),
    "gpt_neox": Family(
        (FfnWidth("intermediate_size"),), ("mlp.dense_h_to_4h",), head_size="derived"
    ),
    "opt": Family((FfnWidth("ffn_dim"),), ("fc1",), head_size="derived"),
    # one ratio for every stage: stage i is 2^i times as wide, its FFN too
    "swin": Family((FfnWidth("mlp_ratio", ratio=True),), ("mlp.fc1",), head_size="derived"),
}


def family_of(config: Any) -> Family:
    """The description of `config`'s family (`DEFAULT` when the registry does not name it)."""
    return FAMILIES.get(getattr(config, "model_type", ""), DEFAULT)
