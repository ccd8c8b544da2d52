"""An `hf` output is loaded back from the files as written before a job may succeed (DESIGN §5).

The folder is loaded with the class the upload names (`config.architectures[0]`), as its user
would, and must rebuild the pruned module exactly: every tensor present with its shape, nothing
left over, and the same outputs on the job's example batch (largest |Δ| relative to the largest
|output|, at most `TOLERANCE`). A sentence-transformers folder must also load with
`SentenceTransformer` (where the package is installed) and give the same token states. A config
the class rebuilds differently, a missing or mismatched tensor, or outputs that differ fail the
job with `export_mismatch`, naming what differs: an output that does not load is never a
success.

The `safetensors` output (weights + `pruning-plan.json`) is rebuilt as its users rebuild it
(`verify_plan`): the original architecture from the upload's config, the plan as written replayed
on it (`apply_plan_`), the weights as written loaded with `load_state_dict(strict=True)`, and the
same outputs on the example batch. An upload without a config (a pickled module) has no original
architecture to rebuild here: its checks say the replay was not verified.
"""

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from service.core.errors import CodedError
from worker.engine.plan import Plan, apply_plan_
from worker.pipeline import precision
from worker.pipeline.models import ModelRejected, architecture_class, sentence_modules

REPLAYED_WITH = "apply_plan_ + load_state_dict"
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


def verify_plan(
    model: nn.Module, inputs: dict[str, Any], source: Path | None, folder: Path
) -> dict[str, Any]:
    """Rebuild the `safetensors` output in `folder` (`model.safetensors`, `pruning-plan.json`)
    from the original architecture of the upload in `source` and compare it with `model`; the
    checks for the job's result, or `ExportMismatch`. Without `source` (a pickled module) the
    checks say why the replay was not verified.

    The original is built once on the CPU without random initialisation (every persistent
    tensor is then loaded from the file; non-persistent buffers are what the class computes),
    traced in float32 as the engine traced it, cast to the saved dtype, and dropped on return:
    at the peak the pruned model, the rebuilt one and the file's tensors are held at once."""
    if source is None:
        return {
            "not_verified": "the plan's replay: the upload has no config to rebuild the original"
        }
    rebuilt = _replayed(
        source,
        inputs,
        Plan.from_json(json.loads((folder / "pruning-plan.json").read_text(encoding="utf-8"))),
    )
    state = load_file(str(folder / "model.safetensors"))
    _same_state(rebuilt, state)
    rebuilt.to(precision.saved_dtype(model))
    try:
        rebuilt.load_state_dict(state, strict=True)
    except RuntimeError as error:  # what _same_state does not foresee: one line of torch's
        raise ExportMismatch(f"{_REBUILD}: {_first_line(error)}") from error
    del state
    with torch.no_grad():
        expected = first_output(model(**inputs))
        try:
            actual = first_output(rebuilt.eval()(**inputs))
        except Exception as error:  # shapes alike, structure not: a head count the plan lacks
            raise ExportMismatch(
                f"the safetensors output rebuilt with {REPLAYED_WITH} does not run on the "
                f"example batch: {_first_line(error)}"
            ) from error
    what = f"the safetensors output rebuilt with {REPLAYED_WITH}"
    return {"loaded_with": REPLAYED_WITH} | compare(expected, actual, what, TOLERANCE)


_REBUILD = f"the safetensors output does not rebuild the pruned model with {REPLAYED_WITH}"


def _replayed(source: Path, inputs: dict[str, Any], plan: Plan) -> nn.Module:
    """The upload's architecture from its config, in float32 on the CPU, with `plan` replayed."""
    import transformers
    from transformers.initialization import no_init_weights

    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    try:
        cls = architecture_class(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stated = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
            with no_init_weights():  # the strict load below overwrites every weight
                original = cls._from_config(stated, dtype=torch.float32)  # type: ignore[attr-defined]
    except Exception as error:  # a config transformers builds no model from
        raise ExportMismatch(
            f"the upload's config does not build the original architecture: {_first_line(error)}"
        ) from error
    traced = {
        k: precision.cast(v, torch.float32) if isinstance(v, Tensor) else v
        for k, v in inputs.items()
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return apply_plan_(original.eval(), traced, plan)
    except Exception as error:  # a plan naming a module the original lacks, a wrong index…
        raise ExportMismatch(
            f"the pruning plan does not replay on {cls.__name__}: {_first_line(error)}"
        ) from error


def _same_state(rebuilt: nn.Module, state: dict[str, Tensor]) -> None:
    """What `load_state_dict(strict=True)` checks, named: every tensor of the replayed model in
    the file with its shape, and nothing else. A tied weight (an LM head sharing the input
    embeddings) is one parameter under two names: the file holds a copy under each, and both
    load into the one parameter."""
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    wrong: list[str] = []
    if missing := sorted(set(expected) - set(found)):
        wrong.append(f"missing from the file: {_names(missing)}")
    if unexpected := sorted(set(found) - set(expected)):
        wrong.append(f"not in the replayed model: {_names(unexpected)}")
    if shapes := sorted(k for k in set(expected) & set(found) if expected[k] != found[k]):
        first = shapes[0]
        wrong.append(
            f"shapes differ: {_names(shapes)} ({first}: {list(expected[first])} replayed, "
            f"{list(found[first])} written)"
        )
    if wrong:
        raise ExportMismatch(f"{_REBUILD}: " + "; ".join(wrong))


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


def _names(keys: list[str]) -> str:
    more = f", … ({len(keys)} in all)" if len(keys) > NAMED else ""
    return ", ".join(keys[:NAMED]) + more
