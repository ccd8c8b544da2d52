"""Loading uploaded datasets as named columns, and cutting them into batches.

- `tensors`: .safetensors or .npz of named arrays (no pickle): forward arguments + `labels`.
- `jsonl`: lines of {"text": …, "label": …}, tokenised with the model's own tokenizer.
- `imagefolder`: a zip of one folder per class: `pixel_values` (preprocessed) and `labels`
  (classes in sorted order).
"""

import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.core import archives
from service.core.errors import CodedError
from worker.pipeline import precision
from worker.pipeline.models import LoadedModel, forward_inputs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
MAX_TEXT_LENGTH = 512


class DatasetRejected(CodedError, ValueError):
    """Data the job cannot use with its model (shape, vocabulary, labels); the message says what."""


def load(
    path: Path, data_format: str, loaded: LoadedModel, preprocess: dict[str, Any] | None = None
) -> dict[str, Tensor]:
    if data_format == "tensors":
        columns = load_tensors(path)
    elif data_format == "jsonl":
        columns = load_jsonl(path, loaded)
    elif data_format == "imagefolder":
        columns = load_imagefolder(path, loaded, preprocess or {})
    else:
        raise DatasetRejected("unsupported_format", f"unknown dataset format {data_format!r}")
    rows = {name: t.shape[0] if t.dim() else 0 for name, t in columns.items()}
    if not columns or len(set(rows.values())) != 1 or 0 in rows.values():
        raise DatasetRejected("invalid_dataset", f"arrays must share a non-zero row count: {rows}")
    check_columns(columns, loaded)
    return columns


def check_columns(columns: dict[str, Tensor], loaded: LoadedModel) -> None:
    """Every column but `labels` (the loss's) goes to the model's forward by name: refuse,
    before any pass, columns it lacks an argument for and inputs it needs that are missing.
    Found by the first forward pass, they would fail the job mid-way as an internal error."""
    inputs = forward_inputs(loaded.model)
    missing = [name for name in inputs.needed if name not in columns]
    unknown = [] if inputs.takes_any else sorted(set(columns) - {"labels", *inputs.named})
    if not missing and not unknown:
        return
    wants = (
        f"needs {', '.join(inputs.needed)}" if inputs.needed else f"takes {', '.join(inputs.named)}"
    )
    refused = f" and has no argument {', '.join(unknown)}" if unknown else ""
    raise DatasetRejected(
        "invalid_dataset",
        f"the dataset has columns {', '.join(sorted(columns))}; {type(loaded.model).__name__} "
        f"{wants}{refused}: name the arrays after its forward's arguments (plus labels)",
    )


def load_tensors(path: Path) -> dict[str, Tensor]:
    if zipfile.is_zipfile(path):
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return {name: torch.from_numpy(arrays[name]) for name in arrays.files}
        except ValueError as error:
            raise DatasetRejected("invalid_dataset", f"the .npz does not load: {error}") from error
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise DatasetRejected(
            "invalid_dataset", f"the file is neither .npz nor valid .safetensors: {error}"
        ) from error


def load_jsonl(path: Path, loaded: LoadedModel) -> dict[str, Tensor]:
    from transformers import AutoTokenizer

    texts, labels = [], []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise DatasetRejected("invalid_dataset", f"line {number} is not JSON") from error
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DatasetRejected("invalid_dataset", f"line {number} has no 'text' string")
            texts.append(row["text"])
            if "label" in row:
                labels.append(row["label"])
    if labels and len(labels) != len(texts):
        raise DatasetRejected("invalid_dataset", "either every line has a 'label' or none does")
    if loaded.directory is None:
        raise DatasetRejected(
            "missing_tokenizer", "jsonl data needs a model upload with its tokenizer"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(loaded.directory, local_files_only=True)
    except Exception as error:  # no tokenizer files in the upload
        raise DatasetRejected(
            "missing_tokenizer", "jsonl data needs the model upload to include its tokenizer"
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(
        texts, padding=True, truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
    )
    columns = {k: v for k, v in encoded.items() if isinstance(v, Tensor)}
    if labels:
        columns["labels"] = torch.tensor(labels)
    return columns


def load_imagefolder(
    path: Path, loaded: LoadedModel, preprocess: dict[str, Any]
) -> dict[str, Tensor]:
    from PIL import Image, UnidentifiedImageError

    height, width, mean, std = _image_settings(loaded, preprocess)
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        archives.extract(path, root)
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        classes = sorted({p.parent.name for p in images})
        if not images:
            raise DatasetRejected("invalid_dataset", "the archive holds no images in class folders")
        pixels, labels = [], []
        for image_path in images:
            try:
                with Image.open(image_path) as image:
                    rgb = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
            except (UnidentifiedImageError, OSError) as error:
                raise DatasetRejected(
                    "invalid_dataset", f"{image_path.name} is not a readable image"
                ) from error
            # (H, W, C) uint8 -> (C, H, W) float in [0, 1]
            tensor = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
            pixels.append((tensor - mean[:, None, None]) / std[:, None, None])
            labels.append(classes.index(image_path.parent.name))
    return {"pixel_values": torch.stack(pixels), "labels": torch.tensor(labels)}


def _image_settings(
    loaded: LoadedModel, preprocess: dict[str, Any]
) -> tuple[int, int, Tensor, Tensor]:
    """Size and normalisation: the job spec, else preprocessor_config.json, else the config."""
    processor: dict[str, Any] = {}
    config_file = loaded.directory / "preprocessor_config.json" if loaded.directory else None
    if config_file is not None and config_file.is_file():
        processor = json.loads(config_file.read_text())
    size: Any = (
        preprocess.get("size")
        or processor.get("size")
        or getattr(getattr(loaded.model, "config", None), "image_size", 224)
    )
    if isinstance(size, dict):
        edge = size.get("shortest_edge")
        height, width = (edge, edge) if edge else (size["height"], size["width"])
    else:
        height = width = int(size)
    mean = torch.tensor(preprocess.get("mean") or processor.get("image_mean") or [0.5] * 3)
    std = torch.tensor(preprocess.get("std") or processor.get("image_std") or [0.5] * 3)
    return int(height), int(width), mean, std


def split(
    columns: dict[str, Tensor], fraction: float
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The last `fraction` of rows held out for evaluation (at least one row each side)."""
    rows = next(iter(columns.values())).shape[0]
    held = min(max(1, round(rows * fraction)), rows - 1)
    if rows < 2:
        raise DatasetRejected("invalid_dataset", "an evaluation fraction needs at least two rows")
    return (
        {k: v[: rows - held] for k, v in columns.items()},
        {k: v[rows - held :] for k, v in columns.items()},
    )


def batches(
    columns: dict[str, Tensor],
    count: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Up to `count` consecutive batches of `batch_size` rows (fewer if the data runs out), on
    `device`; floating columns in `dtype` (the model's) when given."""
    rows = next(iter(columns.values())).shape[0]

    def moved(column: Tensor) -> Tensor:
        column = column.to(device)
        return column if dtype is None else precision.cast(column, dtype)

    return [
        {name: moved(t[start : start + batch_size]) for name, t in columns.items()}
        for start in range(0, min(rows, count * batch_size), batch_size)
    ]
