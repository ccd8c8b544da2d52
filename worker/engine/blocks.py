"""Removing whole blocks from a model: the surgery depth pruning and plan replay share, with the
Hugging Face config kept consistent (layer count, per-layer lists, each block's `layer_idx`)."""

from torch import nn

LAYER_COUNT_ATTRIBUTES = ("num_hidden_layers", "n_layer")


def remove_blocks_(model: nn.Module, container_name: str, indices: list[int]) -> None:
    """Delete blocks `indices` (current positions); renumber what follows; update the config
    (layer count and per-layer lists such as `layer_types`)."""
    blocks = dict(model.named_modules())[container_name]
    assert isinstance(blocks, nn.ModuleList)
    before = len(blocks)
    for index in sorted(set(indices), reverse=True):
        del blocks[index]
    for position, block in enumerate(blocks):
        for module in block.modules():  # key/value caches and per-layer settings index by it
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", position)  # noqa: B010
    config = getattr(model, "config", None)
    if config is None:
        return
    for attribute in LAYER_COUNT_ATTRIBUTES:
        if isinstance(getattr(config, attribute, None), int):
            setattr(config, attribute, len(blocks))
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == before:
        drop = set(indices)
        config.layer_types = [t for i, t in enumerate(types) if i not in drop]
