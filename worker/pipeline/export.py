"""Writing pruned models in formats people load without our code.

| format | file | loads with |
|---|---|---|
| `hf` | model-hf.zip | `from_pretrained` / `SentenceTransformer` on its folder (checked here) |
| `safetensors` | weights + plan | original + `apply_plan_` + `load_state_dict` (checked*) |
| `onnx` | model.onnx | onnxruntime (checked against torch here) |
| `pt2` | model.pt2 | `torch.export.load(...).module()` (checked against torch here) |
| `torch_pickle` | model.pt | `torch.load(weights_only=False)`: trusted mode only |

*for an `hf` upload, whose config rebuilds the original architecture; not for a pickled module.
"""

import json
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from service.core.errors import CodedError
from worker.engine.plan import Plan
from worker.pipeline.models import sentence_modules, sentence_pooling
from worker.pipeline.verify import ExportMismatch, compare, verify_hf, verify_plan

MAX_EXPORT_BATCH = 4096
# onnxruntime and torch.export's graphs fuse and reorder float operations: rounding differs by
# more than a reload's, a wrong graph by far more
RUNTIME_TOLERANCE = 1e-3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")
RUNTIME_SUFFIXES = (".onnx", ".onnx_data", ".pt2", ".gguf")  # other runtimes' copies of weights


@dataclass
class Exported:
    format: str
    path: Path
    checks: dict[str, Any] = field(default_factory=dict)  # e.g. max |Δ| against torch
    target: dict[str, float] | None = None  # a family member's target ({"macs": 0.5})


class _Positional(nn.Module):
    """Keyword-input models (Hugging Face) as a function of positional tensors returning the
    first output tensor (logits), which is what exporters and runtimes expect."""

    def __init__(self, model: nn.Module, names: list[str], constants: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.names, self.constants = model, names, constants

    def forward(self, *tensors: Tensor) -> Tensor:
        output = self.model(**dict(zip(self.names, tensors, strict=True)), **self.constants)
        if isinstance(output, Tensor):
            return output
        return output.logits if hasattr(output, "logits") else output[0]


def _split(inputs: dict[str, Any]) -> tuple[list[str], tuple[Tensor, ...], dict[str, Any]]:
    names = [k for k, v in inputs.items() if isinstance(v, Tensor)]
    constants = {k: v for k, v in inputs.items() if not isinstance(v, Tensor)}
    return names, tuple(inputs[k] for k in names), constants


def export(
    fmt: str, model: nn.Module, inputs: dict[str, Any], source: Path | None, out: Path, plan: Plan
) -> Exported:
    model = model.eval()
    if fmt == "hf":
        return export_hf(model, inputs, source, out)
    if fmt == "safetensors":
        return export_safetensors(model, plan, out, inputs, source)
    if fmt in ("onnx", "pt2"):
        runtime = export_onnx if fmt == "onnx" else export_pt2
        with _converting(fmt, model):
            return runtime(model, inputs, out)
    if fmt == "torch_pickle":
        path = out / "model.pt"
        torch.save(model, path)
        return Exported(fmt, path)
    raise ValueError(f"unknown output format {fmt!r}")


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class ExportFailed(CodedError):
    """An exporter that cannot convert the pruned model (torch.onnx or torch.export): the job
    fails with a code and the outputs that remain, not as an internal error."""

    def __init__(self, message: str) -> None:
        super().__init__("export_failed", message)


@contextmanager
def _converting(fmt: str, model: nn.Module) -> Iterator[None]:
    """Turn an exporter's failure into `ExportFailed`, in one line; running out of memory and
    a failed check (`ExportMismatch`) pass through as they are."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, ExportMismatch):
        raise
    except Exception as error:
        plain = ANSI_ESCAPE.sub("", str(error)).strip()  # torch.onnx colours its messages
        first = (plain.splitlines() or [""])[0][:200]
        others = ", ".join(f for f in ("pt2", "safetensors", "hf") if f != fmt)
        raise ExportFailed(
            f"the {fmt} exporter cannot convert {type(model).__name__} "
            f"({type(error).__name__}: {first}); ask for {others} instead"
        ) from error


def export_hf(model: nn.Module, inputs: dict[str, Any], source: Path | None, out: Path) -> Exported:
    """A zip of a Hugging Face directory: `from_pretrained` on its extraction loads the pruned
    model, which is checked on the files before they are zipped (`verify.verify_hf`).
    Tokenizer and preprocessor files of the upload are carried over, and so are its
    sentence-transformers modules (`1_Pooling/`, `2_Normalize/`…), so that a sentence-transformers
    folder comes back as one."""
    with tempfile.TemporaryDirectory() as work:
        directory = Path(work) / "model"
        directory.mkdir()
        if source is not None:
            _copy_companions(source, directory)
        model.save_pretrained(directory, safe_serialization=True)  # type: ignore[operator]
        if source is not None:
            _restate_pooling_width(model, source, directory)
        checks = verify_hf(model, inputs, directory)
        archive = out / "model-hf.zip"
        _zip_folder(directory, archive)
    return Exported("hf", archive, checks)


def _copy_companions(source: Path, directory: Path) -> None:
    """Everything of the upload but the model's own weights and config: top-level files, and
    subfolders that hold no weights (a Pooling config) or are modules of its sentence-
    transformers pipeline (a Dense layer's weights, which pruning leaves alone). Other folders
    with weights (`onnx/`, `openvino/`) are exports of the unpruned model: left out."""
    modules = {PurePosixPath(path).parts[0] for path in sentence_modules(source).values() if path}
    for item in source.iterdir():
        if item.is_file() and not _is_weights_or_config(item.name):
            shutil.copy2(item, directory / item.name)
        elif item.is_dir() and (item.name in modules or not _holds_weights(item)):
            shutil.copytree(item, directory / item.name)


def _holds_weights(folder: Path) -> bool:
    return any(f.name.endswith(WEIGHT_SUFFIXES + RUNTIME_SUFFIXES) for f in folder.rglob("*"))


def _restate_pooling_width(model: nn.Module, source: Path, directory: Path) -> None:
    """The Pooling config states the width of the token states it pools: keep it equal to the
    saved model's hidden size."""
    pooling = sentence_pooling(source)
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    config_file = directory / pooling.config if pooling is not None else None
    if config_file is None or not config_file.is_file() or not isinstance(hidden_size, int):
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # sentence-transformers renamed the key; a folder states one or the other
    for key in ("word_embedding_dimension", "embedding_dimension"):
        if key in config:
            config[key] = hidden_size
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def export_safetensors(
    model: nn.Module, plan: Plan, out: Path, inputs: dict[str, Any], source: Path | None
) -> Exported:
    """Weights plus the plan that shapes the original architecture to receive them, zipped; the
    files are rebuilt as their users rebuild them (the upload's architecture, the plan replayed,
    the weights loaded strictly) and compared with `model` before they are zipped
    (`verify.verify_plan`)."""
    archive = out / "model-safetensors.zip"
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(_untie(state), str(folder / "model.safetensors"))
        del state
        (folder / "pruning-plan.json").write_text(json.dumps(plan.to_json(), indent=1))
        checks = verify_plan(model, inputs, source, folder)
        _zip_folder(folder, archive)
    return Exported("safetensors", archive, checks)


def _untie(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses tensors sharing memory (tied embeddings); give each its own copy
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def _batch_dynamic(tensors: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], Any]:
    """Two-row example inputs and a dynamic batch axis for the exporters: an example of one row
    would make torch.export specialise the batch to 1."""
    two = tuple(torch.cat([t[:1], t[:1]]) for t in tensors)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    return two, (tuple({0: batch} for _ in tensors),)


def _exported_program(
    wrapper: nn.Module, tensors: tuple[Tensor, ...]
) -> tuple[torch.export.ExportedProgram, bool]:
    """The traced program with a dynamic batch axis, or with fixed shapes if the model's code
    ties the batch size down; returns whether the batch is dynamic."""
    two, dynamic = _batch_dynamic(tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters are chatty about internals
        try:
            return torch.export.export(wrapper, two, dynamic_shapes=dynamic), True
        except Exception:  # torch.export reports a specialised batch in several ways
            return torch.export.export(wrapper, tensors), False


def export_onnx(model: nn.Module, inputs: dict[str, Any], out: Path) -> Exported:
    import onnxruntime

    names, tensors, constants = _split(inputs)
    wrapper = _Positional(model, names, constants)
    program, dynamic = _exported_program(wrapper, tensors)
    path = out / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            program,
            (),
            str(path),
            input_names=names,
            output_names=["output"],
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = _batch_dynamic(tensors)[0] if dynamic else tensors
    actual = session.run(None, {n: t.cpu().numpy() for n, t in zip(names, probe, strict=True)})[0]
    with torch.no_grad():
        expected = wrapper(*probe).cpu()
    checks = compare(expected, torch.from_numpy(actual), "the onnx output", RUNTIME_TOLERANCE)
    return Exported("onnx", path, checks | {"dynamic_batch": dynamic})


def export_pt2(model: nn.Module, inputs: dict[str, Any], out: Path) -> Exported:
    names, tensors, constants = _split(inputs)
    wrapper = _Positional(model, names, constants)
    program, dynamic = _exported_program(wrapper, tensors)
    path = out / "model.pt2"
    torch.export.save(program, str(path))
    reloaded = torch.export.load(str(path)).module()
    probe = _batch_dynamic(tensors)[0] if dynamic else tensors
    with torch.no_grad():
        checks = compare(wrapper(*probe), reloaded(*probe), "the pt2 output", RUNTIME_TOLERANCE)
    return Exported("pt2", path, checks | {"dynamic_batch": dynamic})


def _zip_folder(folder: Path, archive: Path) -> None:
    """Weights are stored as they are (deflate takes seconds per 100 MB to save about 8% of
    float weights); configs, tokenizers and the rest are deflated."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                weights = file.name.endswith(WEIGHT_SUFFIXES)
                method = zipfile.ZIP_STORED if weights else zipfile.ZIP_DEFLATED
                bundle.write(file, file.relative_to(folder).as_posix(), compress_type=method)


def _is_weights_or_config(name: str) -> bool:
    return name == "config.json" or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")
