"""Dataset uploads checked before they are stored: pure Python (the API has no torch), so a
malformed file is a 422 at once rather than a failed job later."""

import json
import zipfile
from pathlib import Path, PurePosixPath

from service.core import archives
from service.core.errors import CodedError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class InvalidDataset(CodedError, ValueError):
    """A dataset upload that is not what its format says; checked before it is stored."""


def check(path: Path, data_format: str, name: str) -> None:
    """Raise `InvalidDataset` unless `path` is what `data_format` says; messages call the file
    `name` (the user's file name, never the spool's)."""
    try:
        if data_format == "tensors":
            _tensors(path, name or "the file")
        else:
            {"jsonl": _jsonl, "imagefolder": _imagefolder}[data_format](path)
    except archives.UnsafeArchive as error:
        raise InvalidDataset(error.code, str(error)) from error


def _tensors(path: Path, name: str) -> None:
    """An .npz (a zip of .npy arrays, loaded without pickle later) or a sound safetensors file."""
    if zipfile.is_zipfile(path):
        with archives.entries(path) as listing:
            if not listing or any(PurePosixPath(e.path).suffix != ".npy" for e in listing):
                raise InvalidDataset("invalid_dataset", "an .npz must hold only .npy arrays")
        archives.check_integrity(path)
        return
    size = path.stat().st_size
    entry = archives.Entry(PurePosixPath(name), size, False, lambda: path.open("rb"))
    try:
        archives.check_safetensors(entry)
    except archives.UnsafeArchive as error:
        raise InvalidDataset(
            "invalid_dataset", f"tensors must be .npz or .safetensors: {error}"
        ) from error


def _jsonl(path: Path) -> None:
    rows = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as error:
                raise InvalidDataset(
                    "invalid_dataset", f"line {number} is not UTF-8 JSON (or nests too deep)"
                ) from error
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InvalidDataset(
                    "invalid_dataset", f'line {number} is not an object with a "text" string'
                )
            if "label" in row and not isinstance(row["label"], (int, float)):
                raise InvalidDataset("invalid_dataset", f'line {number}: "label" is not a number')
            rows += 1
    if rows == 0:
        raise InvalidDataset("invalid_dataset", "the file holds no rows")


def _imagefolder(path: Path) -> None:
    with archives.entries(path) as listing:
        images = [
            e.path
            for e in listing
            if not e.is_dir and PurePosixPath(e.path).suffix.lower() in IMAGE_SUFFIXES
        ]
    if not images or any(len(PurePosixPath(p).parts) < 2 for p in images):
        raise InvalidDataset(
            "invalid_dataset", "imagefolder needs a zip of class folders holding images"
        )
    archives.check_integrity(path)
