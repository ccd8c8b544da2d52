"""Loading uploaded datasets and cutting them into calibration batches.

`tensors`: a .safetensors or .npz file of named arrays, rows along the first axis, keys named
after the model's forward arguments (`input_ids`, `attention_mask`, `pixel_values`…) plus an
optional `labels`. Loaded without pickle.
"""

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


class DatasetRejected(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def load_tensors(path: Path) -> dict[str, Tensor]:
    if zipfile.is_zipfile(path):
        try:
            with np.load(path, allow_pickle=False) as arrays:
                columns = {name: torch.from_numpy(arrays[name]) for name in arrays.files}
        except ValueError as error:
            raise DatasetRejected("invalid_dataset", f"the .npz does not load: {error}") from error
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            columns = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise DatasetRejected(
                "invalid_dataset", f"the file is neither .npz nor valid .safetensors: {error}"
            ) from error
    if not columns:
        raise DatasetRejected("invalid_dataset", "the dataset holds no arrays")
    rows = {name: t.shape[0] if t.dim() else 0 for name, t in columns.items()}
    if len(set(rows.values())) != 1 or 0 in rows.values():
        raise DatasetRejected("invalid_dataset", f"arrays disagree on their number of rows: {rows}")
    return columns


def batches(
    columns: dict[str, Tensor], count: int, batch_size: int, device: torch.device
) -> list[dict[str, Any]]:
    """Up to `count` consecutive batches of `batch_size` rows (fewer if the data runs out)."""
    rows = next(iter(columns.values())).shape[0]
    out = []
    for start in range(0, min(rows, count * batch_size), batch_size):
        out.append({name: t[start : start + batch_size].to(device) for name, t in columns.items()})
    return out
