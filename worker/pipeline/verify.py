"""An `hf` output is loaded back from the files as written before a job may succeed (DESIGN §5).

The folder is loaded with the class the upload names (`config.architectures[0]`), as its user
would, and must rebuild the pruned module exactly: every tensor present with its shape, nothing
left over, and the same outputs on the job's example batch (largest |Δ| relative to the largest
|output|, at most `TOLERANCE`). A sentence-transformers folder must also load with
`SentenceTransformer` (where the package is installed) and give the same token states. A config
the class rebuilds differently, a missing or mismatched tensor, or outputs that differ fail the
job with `export_mismatch`, naming what differs: an output that does not load is never a
success.
"""

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from service.core.errors import CodedError
from worker.pipeline import precision
from worker.pipeline.models import ModelRejected, architecture_class, sentence_modules

TOLERANCE = 1e-4  # relative: the same weights and code in the same dtype differ by rounding only
NAMED = 3  # tensors named in a message


class ExportMismatch(CodedError):
    def __init__(self, message: str) -> None:
        super().__init__("export_mismatch", message)


def verify_hf(model: nn.Module, inputs: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Load `directory` back and compare it with `model`; the checks for the job's result, or
    `ExportMismatch`."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    try:
        cls = architecture_class(config)
    except ModelRejected as error:
        raise ExportMismatch(f"the hf output's config names no loadable class: {error}") from error
    dtype = precision.saved_dtype(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reloaded, info = cls.from_pretrained(  # type: ignore[attr-defined]
                directory,
                local_files_only=True,
                trust_remote_code=False,
                output_loading_info=True,
                dtype=dtype,
                # a tensor the config shapes otherwise is reported below, with its shapes
                ignore_mismatched_sizes=True,
            )
    except Exception as error:  # transformers raises many types for a folder it cannot load
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ExportMismatch(
            f"the hf output does not load with {cls.__name__}.from_pretrained: {first_line}"
        ) from error
    _same_tensors(model, reloaded.eval(), info, cls.__name__)
    difference = _difference(model, reloaded, inputs, f"{cls.__name__}.from_pretrained")
    checks: dict[str, Any] = {"loaded_with": cls.__name__} | difference
    if sentence_modules(directory):
        checks["sentence_transformers"] = _verify_sentence_transformers(model, inputs, directory)
    return checks


def _same_tensors(model: nn.Module, reloaded: nn.Module, info: dict[str, Any], name: str) -> None:
    wrong: list[str] = []
    for kind in ("missing_keys", "unexpected_keys"):  # mismatched ones: as shapes, below
        keys = sorted(str(key) for key in info.get(kind) or [])
        if keys:
            wrong.append(f"{kind.replace('_', ' ')}: {_names(keys)}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in reloaded.state_dict().items()}
    if absent := sorted(set(expected) - set(found)):
        wrong.append(f"not rebuilt: {_names(absent)}")
    shapes = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if shapes:
        first = shapes[0]
        wrong.append(
            f"shapes differ: {_names(shapes)} ({first}: {list(found[first])} rebuilt from the "
            f"config, {list(expected[first])} pruned)"
        )
    if wrong:
        raise ExportMismatch(
            f"the hf output does not rebuild the pruned model with {name}.from_pretrained: "
            + "; ".join(wrong)
        )


def _difference(
    model: nn.Module, reloaded: nn.Module, inputs: dict[str, Any], loader: str
) -> dict[str, float]:
    with torch.no_grad():
        expected = first_output(model(**inputs))
        actual = first_output(reloaded(**inputs))
    return compare(expected, actual, f"the hf output loaded with {loader}", TOLERANCE)


def compare(expected: Tensor, actual: Tensor, what: str, tolerance: float) -> dict[str, float]:
    """The largest |Δ| of `actual` from `expected`, absolute and relative to the largest
    |expected|; `ExportMismatch` past `tolerance` (relative) or for another shape."""
    if actual.shape != expected.shape:
        raise ExportMismatch(
            f"{what} answers with shape {list(actual.shape)}, the pruned model with "
            f"{list(expected.shape)}"
        )
    largest = float((actual.float() - expected.float()).abs().max())
    relative = largest / max(float(expected.float().abs().max()), 1e-12)
    if not relative <= tolerance:  # NaN included
        raise ExportMismatch(
            f"{what} computes another function: its outputs differ from the pruned model's by "
            f"{largest:.3g} ({relative:.2g} of the largest output) on the example batch"
        )
    return {"max_abs_diff": largest, "relative_diff": relative}


def _verify_sentence_transformers(
    model: nn.Module, inputs: dict[str, Any], directory: Path
) -> dict[str, float] | str:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # a worker without the package: the transformers check stands alone
        return "not checked: sentence-transformers is not installed on this worker"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipeline = SentenceTransformer(str(directory), device="cpu", local_files_only=True)
    except Exception as error:  # the folder is not one sentence-transformers loads
        raise ExportMismatch(
            f"the hf output does not load with SentenceTransformer: {error}".splitlines()[0]
        ) from error
    transformer = pipeline[0].auto_model
    assert isinstance(transformer, nn.Module)
    transformer = transformer.to(precision.saved_dtype(model)).eval()
    return _difference(model, transformer, inputs, "SentenceTransformer")


def first_output(output: Any) -> Tensor:
    """The tensor a model answers with first: logits, or the last hidden states."""
    if isinstance(output, Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    return output[0]


def _names(keys: list[str]) -> str:
    more = f", … ({len(keys)} in all)" if len(keys) > NAMED else ""
    return ", ".join(keys[:NAMED]) + more
