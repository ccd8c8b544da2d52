"""Writing pruned models in formats people load without our code."""

import shutil
import tempfile
import zipfile
from pathlib import Path

from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def export_hf(model: nn.Module, source: Path, out: Path) -> Path:
    """A zip of a Hugging Face directory: `from_pretrained` on its extraction loads the pruned
    model. Tokenizer and preprocessor files of the upload are carried over."""
    with tempfile.TemporaryDirectory() as work:
        directory = Path(work) / "model"
        directory.mkdir()
        for item in source.iterdir():
            if item.is_file() and not _is_weights_or_config(item.name):
                shutil.copy2(item, directory / item.name)
        model.save_pretrained(directory, safe_serialization=True)  # type: ignore[operator]
        archive = out / "model-hf.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
            for file in sorted(directory.rglob("*")):
                if file.is_file():
                    bundle.write(file, file.relative_to(directory).as_posix())
    return archive


def _is_weights_or_config(name: str) -> bool:
    return name == "config.json" or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")
