"""Which upload format a file is, from its name and (for zips) its contents: what the CLI and
the SDK send when the user names no format."""

import zipfile
from pathlib import Path

MODEL_SUFFIXES = {".pt": "torch_pickle", ".pth": "torch_pickle", ".pkl": "torch_pickle"}
DATASET_SUFFIXES = {".safetensors": "tensors", ".jsonl": "jsonl"}


class UnknownFormat(ValueError):
    """The file's format cannot be told; the message names the file and the option to pass."""


def model_format(path: Path) -> str:
    if path.suffix.lower() in MODEL_SUFFIXES:
        return MODEL_SUFFIXES[path.suffix.lower()]
    if _zip_names(path) is not None:
        return "hf"  # a zipped Hugging Face folder; the upload's checks say what is missing
    raise UnknownFormat(
        f"{path.name}: cannot tell the model format from the name; zip a Hugging Face folder, "
        "or pass --format hf | torch_pickle"
    )


def dataset_format(path: Path) -> str:
    if path.suffix.lower() in DATASET_SUFFIXES:
        return DATASET_SUFFIXES[path.suffix.lower()]
    names = _zip_names(path)
    if names is not None and any("/" in name.rstrip("/") for name in names):
        return "imagefolder"  # a zip of one folder per class
    raise UnknownFormat(
        f"{path.name}: cannot tell the dataset format from the name; use .safetensors, .jsonl, "
        "a zip of one folder per class, or pass --data-format tensors | jsonl | imagefolder"
    )


def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
