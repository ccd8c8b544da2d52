"""Loading uploaded models: Hugging Face directories, resolved only among transformers' own
classes (never remote code), weights only from safetensors unless trusted mode is on. A
sentence-transformers folder (a Hugging Face model plus `modules.json`) also yields the pooling
that turns its token states into sentence embeddings."""

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.core.errors import CodedError
from worker.engine.families import family_of


class ModelRejected(CodedError, ValueError):
    """The upload is not a model we will load; `code` says why, the message says what to do."""


# sentence-transformers' pooling modes, in the order it concatenates them
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
MAX_JSON_BYTES = 1024 * 1024  # modules.json and a pooling config are a few hundred bytes
MAX_PARAMS = 20_000_000_000  # what the config may describe before anything is allocated


@dataclass(frozen=True)
class Pooling:
    """How a sentence-transformers folder turns token states into its sentence embedding."""

    modes: tuple[str, ...]  # concatenated in this order (POOLING_MODES)
    normalize: bool  # modules.json lists a Normalize module (L2 norm of the embedding)
    config: Path  # the Pooling module's config.json, relative to the model folder


@dataclass(frozen=True)
class ForwardInputs:
    """What a model's forward takes as keyword arguments, as its signature says."""

    named: tuple[str, ...]
    needed: tuple[str, ...]  # the model cannot run without these
    takes_any: bool  # it has **kwargs: any name is an argument


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    # the extracted upload, where tokenizer and preprocessor files live (None for a pickle)
    directory: Path | None
    kind: str  # "text" | "vision"
    pooling: Pooling | None = None  # set for a sentence-transformers folder


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
    if "auto_map" in config:
        raise ModelRejected(
            "remote_code", "config.json declares auto_map: custom model code is never run"
        )
    if has_safetensors:
        _check_weights_cover(cls, directory)
    try:
        model, info = cls.from_pretrained(  # type: ignore[attr-defined]
            directory,
            use_safetensors=has_safetensors,
            trust_remote_code=False,
            local_files_only=True,
            output_loading_info=True,
        )
    except Exception as error:  # transformers raises many types for a broken upload
        raise ModelRejected("invalid_weights", f"the weights do not load: {error}") from error
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ModelRejected(
            "missing_weights",
            f"the weights lack {len(missing)} tensors the config's model needs "
            f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}); they would be "
            "random. Save the model whose config this is (save_pretrained)",
        )
    kind = "vision" if "pixel_values" in forward_inputs(model).named else "text"
    return LoadedModel(model.eval(), directory, kind, sentence_pooling(directory))


def _check_weights_cover(cls: type[nn.Module], directory: Path) -> None:
    """Before anything is allocated: the config's model, built on the meta device, must fit the
    parameter cap, and the safetensors must hold at least as many elements as it has
    parameters. A config alone (a 1 KB upload asking for a huge vocabulary) allocates nothing."""
    import transformers
    from transformers.initialization import no_init_weights

    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
        # as from_pretrained builds its own: initialising meta tensors (torch's Python
        # reference kernels) was half of this check's time
        with torch.device("meta"), no_init_weights():
            skeleton = cls._from_config(config)  # type: ignore[attr-defined]
            skeleton.tie_weights()  # skipped with the initialisation: a tied head counts once
    except Exception as error:  # a config transformers cannot build a model from
        raise ModelRejected(
            "invalid_config", f"config.json does not build a model: {error}"
        ) from error
    # parameters the class computes and never saves (Marian's sinusoidal positions) excepted
    computed = set(getattr(skeleton, "_keys_to_ignore_on_save", None) or ())
    needed = sum(p.numel() for n, p in skeleton.named_parameters() if n not in computed)
    if needed > MAX_PARAMS:
        raise ModelRejected(
            "model_too_large",
            f"the config describes {needed:,} parameters; the limit is {MAX_PARAMS:,}",
        )
    stored = sum(_stored_elements(path) for path in directory.glob("*.safetensors"))
    if stored < needed:
        raise ModelRejected(
            "missing_weights",
            f"the config describes {needed:,} parameters but the weights hold {stored:,} "
            "values: most of the model would be random. Upload the weights with the config "
            "(save_pretrained)",
        )


def _stored_elements(path: Path) -> int:
    """How many values a safetensors file holds, from its header alone (checked at upload)."""
    with path.open("rb") as stream:
        size = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(size))
    return sum(
        math.prod(entry["shape"])
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict)
    )


def sentence_modules(directory: Path) -> dict[str, str]:
    """The modules of a sentence-transformers folder as `modules.json` lists them: class name
    (Transformer, Pooling, Normalize, Dense…) → its folder relative to `directory` ("" for the
    model itself). Empty where there is no modules.json. Read as JSON only."""
    if not (directory / "modules.json").is_file():
        return {}
    listed = _read_json(directory, "modules.json")
    if not isinstance(listed, list) or not all(
        isinstance(m, dict) and isinstance(m.get("type"), str) and isinstance(m.get("path"), str)
        for m in listed
    ):
        raise ModelRejected(
            "invalid_modules", "modules.json is not a list of modules with a type and a path"
        )
    # "sentence_transformers.models.Pooling" and later module paths alike: the class name
    return {m["type"].rpartition(".")[2]: m["path"] for m in listed}


def sentence_pooling(directory: Path) -> Pooling | None:
    """The Pooling (and Normalize) modules that `modules.json` lists, None where the folder has
    no modules.json or it lists no Pooling module. Read as JSON only, from inside `directory`."""
    modules = sentence_modules(directory)
    if "Pooling" not in modules:
        return None
    config_path = (Path(modules["Pooling"]) / "config.json").as_posix()
    config = _read_json(directory, config_path)
    if not isinstance(config, dict):
        raise ModelRejected("invalid_pooling", f"{config_path} is not a JSON object")
    return Pooling(_pooling_modes(config, config_path), "Normalize" in modules, Path(config_path))


def _pooling_modes(config: dict[str, Any], name: str) -> tuple[str, ...]:
    """`pooling_mode` (a name or a list), or the older `pooling_mode_*` booleans; mean when
    neither says anything, as sentence-transformers does."""
    stated = config.get("pooling_mode")
    if stated is None:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key) is True]
    else:
        modes = [stated] if isinstance(stated, str) else stated
    if not isinstance(modes, list) or any(m not in POOLING_MODES for m in modes):
        raise ModelRejected(
            "invalid_pooling", f"{name} states pooling {stated!r}; known modes: {POOLING_MODES}"
        )
    return tuple(modes) or ("mean",)


def _read_json(directory: Path, relative: str) -> Any:
    """A small JSON file at `relative` inside `directory`; never a path that leaves it."""
    path = (directory / relative).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise ModelRejected("invalid_modules", f"{relative!r} points outside the model folder")
    if path.is_file() and path.stat().st_size > MAX_JSON_BYTES:
        raise ModelRejected("invalid_modules", f"{relative} is implausibly large")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelRejected(
            "invalid_modules", f"{relative} is not readable JSON: {error}"
        ) from error


def forward_inputs(model: nn.Module) -> ForwardInputs:
    parameters = inspect.signature(model.forward).parameters.values()
    keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p.name for p in parameters if p.kind in keywords]
    needed = [p.name for p in parameters if p.kind in keywords and p.default is p.empty]
    # transformers' forwards default every input to None and raise when the main one is absent
    main = getattr(model, "main_input_name", None)
    if main in named and main not in needed:
        needed.append(main)
    config = getattr(model, "config", None)
    if (
        getattr(config, "is_encoder_decoder", False)
        and "decoder_input_ids" in named
        and not family_of(config).shifts_decoder_inputs
    ):
        needed.append("decoder_input_ids")  # else its forward fails: its decoder has no input
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return ForwardInputs(tuple(named), tuple(needed), takes_any)


def load(root: Path, model_format: str, *, trusted: bool) -> LoadedModel:
    """An uploaded model: `hf` from its extracted folder, `torch_pickle` (trusted mode only)
    from the pickled module itself."""
    if model_format == "hf":
        return load_hf(root, trusted=trusted)
    if model_format == "torch_pickle":
        if not trusted:
            raise ModelRejected("unsafe_format", "torch_pickle models load only in trusted mode")
        try:
            model = torch.load(root, weights_only=False, map_location="cpu")
        except Exception as error:  # unpickling fails in arbitrary ways
            raise ModelRejected("invalid_model", f"the pickle does not load: {error}") from error
        if not isinstance(model, nn.Module):
            raise ModelRejected("invalid_model", "the pickle does not hold an nn.Module")
        kind = "vision" if "pixel_values" in forward_inputs(model).named else "tensor"
        return LoadedModel(model.eval(), None, kind)
    raise ModelRejected("unsupported_format", f"unknown model format {model_format!r}")


def _example_input(name: str, model: nn.Module) -> torch.Tensor:
    """One row of a text model's input `name`: 16 tokens, or for a speech encoder (Whisper) the
    log-mel frames its config states."""
    config: Any = getattr(model, "config", None)
    if name == "input_features" and hasattr(config, "num_mel_bins"):
        frames = 2 * getattr(config, "max_source_positions", 1500)  # its convolutions halve them
        return torch.zeros(1, config.num_mel_bins, frames)
    return torch.zeros(1, 16, dtype=torch.long)


def example_inputs(
    loaded: LoadedModel, batch: dict[str, Any] | None = None, device: torch.device | None = None
) -> dict[str, Any]:
    """Inputs for tracing, MAC counts and export: one row of `batch` when given, else one image
    of the configured size, or a short token sequence for each input the forward needs (an
    encoder-decoder's `decoder_input_ids` too)."""
    inputs: dict[str, Any]
    if batch is not None:
        inputs = {
            k: v[:1] for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)
        }
    elif loaded.kind == "vision":
        config: Any = getattr(loaded.model, "config", None)
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        inputs = {"pixel_values": torch.zeros(1, channels, size, size)}
    else:
        inputs = {
            name: _example_input(name, loaded.model)
            for name in forward_inputs(loaded.model).needed or ("input_ids",)
        }
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    if "use_cache" in forward_inputs(loaded.model).named:
        inputs["use_cache"] = False  # key/value caches are not part of the model's structure
    return inputs
