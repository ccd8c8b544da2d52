"""`imagefolder` datasets (docs/formats.md, "Data in"): labels in sorted class order, whatever
order the archive holds the folders in; images resized and normalised as the model's
`preprocessor_config.json` says, or as the job's `preprocess` says instead."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.worker import factories
from worker.pipeline import datasets, models
from worker.pipeline.models import LoadedModel

# written to the archive in this order, which is not the sorted one: apple, mango, zebra
COLOURS = {"zebra": (200, 40, 90), "apple": (30, 180, 60), "mango": (250, 160, 10)}
SORTED_LABELS = {"apple": 0, "mango": 1, "zebra": 2}


def _unsorted_imagefolder(path: Path, per_class: int = 2) -> Path:
    """One solid colour per class folder (20×24 pixels), the folders in COLOURS' order."""
    with zipfile.ZipFile(path, "w") as bundle:
        for name, colour in COLOURS.items():
            pixels = np.empty((20, 24, 3), dtype=np.uint8)
            pixels[...] = colour
            image = path.parent / f"{name}.png"
            Image.fromarray(pixels).save(image)
            for i in range(per_class):
                bundle.write(image, f"{name}/{i}.png")
            image.unlink()
        assert list(dict.fromkeys(n.split("/")[0] for n in bundle.namelist())) == list(COLOURS)
    return path


def _vit(root: Path, processor: dict[str, object]) -> LoadedModel:
    folder = factories.vit_folder(root)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return models.load_hf(folder, trusted=False)


def _normalised(colour: tuple[int, int, int], mean: list[float], std: list[float]) -> torch.Tensor:
    """What a solid-colour image becomes, per channel: (value / 255 − mean) / std."""
    return (torch.tensor(colour) / 255 - torch.tensor(mean)) / torch.tensor(std)


def _class_of(pixels: torch.Tensor, mean: list[float], std: list[float]) -> str:
    """The class whose colour this image was, read back from its normalised pixels."""
    [name] = [
        name
        for name, colour in COLOURS.items()
        if torch.allclose(pixels, _normalised(colour, mean, std)[:, None, None], atol=1e-5)
    ]
    return name


def test_labels_follow_the_sorted_class_order_not_the_archive_order(tmp_path: Path) -> None:
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    loaded = _vit(
        tmp_path, {"size": {"height": 16, "width": 16}, "image_mean": mean, "image_std": std}
    )

    columns = datasets.load(_unsorted_imagefolder(tmp_path / "images.zip"), "imagefolder", loaded)

    assert columns["labels"].dtype == torch.long
    seen = [
        (_class_of(pixels, mean, std), int(label))
        for pixels, label in zip(columns["pixel_values"], columns["labels"], strict=True)
    ]
    assert sorted(seen) == sorted([(name, SORTED_LABELS[name]) for name in COLOURS] * 2)


def test_the_preprocessor_config_sets_size_mean_and_std(tmp_path: Path) -> None:
    # height and width apart, and a mean and std per channel, so that a swap shows
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.125]
    loaded = _vit(
        tmp_path, {"size": {"height": 8, "width": 12}, "image_mean": mean, "image_std": std}
    )

    columns = datasets.load(_unsorted_imagefolder(tmp_path / "images.zip"), "imagefolder", loaded)

    pixels = columns["pixel_values"]
    assert pixels.shape == (6, 3, 8, 12) and pixels.dtype == torch.float32
    for image, label in zip(pixels, columns["labels"], strict=True):
        [name] = [n for n, index in SORTED_LABELS.items() if index == label]
        expected = _normalised(COLOURS[name], mean, std)[:, None, None].expand(3, 8, 12)
        torch.testing.assert_close(image, expected)


@pytest.mark.parametrize("partial", [False, True])
def test_the_jobs_preprocess_overrides_the_preprocessor_config(
    tmp_path: Path, partial: bool
) -> None:
    """A job's `preprocess` replaces what it states; what it leaves out still comes from the
    preprocessor config."""
    config_mean, config_std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    loaded = _vit(
        tmp_path,
        {"size": {"height": 16, "width": 16}, "image_mean": config_mean, "image_std": config_std},
    )
    mean, std = [0.2, 0.4, 0.6], [0.3, 0.2, 0.1]
    preprocess = {"size": 10} | ({} if partial else {"mean": mean, "std": std})
    spec = factories.spec(preprocess=preprocess)
    assert spec.preprocess is not None

    columns = datasets.load(
        _unsorted_imagefolder(tmp_path / "images.zip"),
        "imagefolder",
        loaded,
        spec.preprocess.model_dump(),  # as the worker hands it over
    )

    pixels = columns["pixel_values"]
    assert pixels.shape == (6, 3, 10, 10)
    applied_mean, applied_std = (config_mean, config_std) if partial else (mean, std)
    for image, label in zip(pixels, columns["labels"], strict=True):
        [name] = [n for n, index in SORTED_LABELS.items() if index == label]
        expected = _normalised(COLOURS[name], applied_mean, applied_std)
        torch.testing.assert_close(image, expected[:, None, None].expand(3, 10, 10))
