"""Loading uploaded models: Hugging Face directories, resolved only among transformers' own
classes (never remote code), weights only from safetensors unless trusted mode is on."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelRejected(ValueError):
    """The upload is not a model we will load; `code` says why, the message says what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    directory: Path  # the extracted upload (tokenizer and preprocessor files live here too)
    kind: str  # "text" | "vision"


def model_directory(root: Path) -> Path:
    """The folder holding config.json: the archive root or its single top-level folder."""
    if (root / "config.json").is_file():
        return root
    children = [p for p in root.iterdir() if p.is_dir()]
    if len(children) == 1 and (children[0] / "config.json").is_file():
        return children[0]
    raise ModelRejected("missing_config", "the archive has no config.json at its root")


def architecture_class(config: dict[str, Any]) -> type[nn.Module]:
    import transformers

    names = config.get("architectures") or []
    if not names or not isinstance(names[0], str):
        raise ModelRejected("unknown_architecture", "config.json names no architectures[0]")
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelRejected(
            "unknown_architecture",
            f"{names[0]!r} is not a model class of transformers; remote code is never run",
        )
    return cls


def load_hf(root: Path, *, trusted: bool) -> LoadedModel:
    directory = model_directory(root)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelRejected("invalid_config", f"config.json is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ModelRejected("invalid_config", "config.json is not a JSON object")
    cls = architecture_class(config)
    has_safetensors = any(directory.glob("*.safetensors"))
    if not has_safetensors and not (trusted and any(directory.glob("*.bin"))):
        raise ModelRejected(
            "unsafe_format" if any(directory.glob("*.bin")) else "missing_weights",
            "weights must be .safetensors (pickled .bin weights need trusted mode)",
        )
    try:
        model = cls.from_pretrained(  # type: ignore[attr-defined]
            directory,
            use_safetensors=has_safetensors,
            trust_remote_code=False,
            local_files_only=True,
        )
    except Exception as error:  # transformers raises many types for a broken upload
        raise ModelRejected("invalid_weights", f"the weights do not load: {error}") from error
    kind = "vision" if "pixel_values" in _forward_arguments(model) else "text"
    return LoadedModel(model.eval(), directory, kind)


def _forward_arguments(model: nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(model.forward).parameters)


def example_inputs(loaded: LoadedModel, batch_size: int = 1, tokens: int = 16) -> dict[str, Any]:
    """Dummy inputs for tracing and MAC counts: a short token sequence or one image."""
    config: Any = loaded.model.config
    if loaded.kind == "vision":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.zeros(batch_size, channels, size, size)}
    inputs: dict[str, Any] = {"input_ids": torch.zeros(batch_size, tokens, dtype=torch.long)}
    if "use_cache" in _forward_arguments(loaded.model):
        inputs["use_cache"] = False  # key/value caches are not part of the model's structure
    return inputs
