"""The job on one family of `tests/worker/family_zoo.py`, and the row of `docs/families.md`
that says what it did. `tests/worker/test_families.py` runs each job once and holds its row to
the document's; this module, run as a script, writes the document:

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.worker.family_jobs --write docs/families.md
"""

import argparse
import dataclasses
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from service.jobs.results import JobResult
from tests.worker import factories
from tests.worker.family_zoo import FAMILIES
from worker.engine import TargetUnreachable
from worker.pipeline.steps import JobFailed, JobFiles, execute

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "families.md"
COMMAND = "HF_HUB_OFFLINE=1 .venv/bin/python -m tests.worker.family_jobs --write docs/families.md"
TARGET = 0.5  # of the MACs, with an hf output
HEADERS = ("family", "`model_type`", "class", "what moved", "MACs with `hf`", "reload difference")
Refusal = TargetUnreachable | JobFailed


@dataclass(frozen=True)
class FamilyJob:
    """A job on one family: its model's config before pruning, and the job's result and hf
    archive (every output's archive, by format), or the refusal that came before anything was
    pruned."""

    name: str
    model_class: str
    config: Any
    result: JobResult | None
    hf: Path | None
    refusal: Refusal | None
    archives: dict[str, Path] = dataclasses.field(default_factory=dict)


def run_job(
    folder: Path, name: str, target: float = TARGET, outputs: tuple[str, ...] = ("hf",)
) -> FamilyJob:
    """The job on family `name` uploaded as an hf folder, pruned to `target` of its MACs with
    `outputs` (an hf output: widths its config states), in `folder`. Seeded: the same code gives
    the same model, data and result."""
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.build()
    model.save_pretrained(folder / "upload")
    spec = factories.spec(
        outputs=list(outputs),
        loss=family.loss,
        method=family.method,
        target={"macs": target},
        calibration={"batches": 2, "batch_size": 4},
    )
    data = family.data(folder / "data.safetensors")
    (folder / "work").mkdir()
    files = JobFiles(folder / "upload", "hf", data, "tensors", None, folder / "work")
    job = FamilyJob(name, type(model).__name__, model.config, None, None, None)
    try:
        result, exports = execute(spec, files, torch.device("cpu"), False, lambda progress: None)
    except (TargetUnreachable, JobFailed) as refusal:
        return dataclasses.replace(job, refusal=refusal)
    archives = {e.format: e.path for e in exports}
    return dataclasses.replace(job, result=result, hf=archives.get("hf"), archives=archives)


def reload(job: FamilyJob, folder: Path) -> nn.Module:
    """The job's hf output as its users load it: extracted into `folder`, with the class its
    config names, in eval mode."""
    assert job.hf is not None
    with zipfile.ZipFile(job.hf) as bundle:
        bundle.extractall(folder)
    config: Any = transformers.AutoConfig.from_pretrained(folder)
    model: nn.Module = getattr(transformers, config.architectures[0]).from_pretrained(folder)
    return model.eval()


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _moved(config: Any, updates: dict[str, Any]) -> str:
    """The config fields the job wrote that differ from the upload's, `field` before → after."""
    moved = []
    for field, after in sorted(updates.items()):
        before = getattr(config, field, None)
        if before is None:
            moved.append(f"`{field}` = {_value(after)} (new)")
        elif before != after:
            moved.append(f"`{field}` {_value(before)} → {_value(after)}")
    return ", ".join(moved) or "nothing"


def _bucket(relative_diff: float) -> str:
    """The hf reload check's relative difference by decade: the same on machines whose kernels
    differ in the last bits. Exactly 0 and a few ulps share one: which of the two a BERT's
    reload gives moved with the load on this machine (kernels split their sums by it)."""
    for bound, label in ((1e-6, "< 1e-6"), (1e-4, "< 1e-4")):
        if relative_diff < bound:
            return label
    return "≥ 1e-4"


def macs_reached(job: FamilyJob) -> str:
    """The fraction of its MACs the pruned model keeps, or why the job refused to prune."""
    if isinstance(job.refusal, TargetUnreachable):
        per_layer = job.refusal.per_layer
        other = f" (onnx, pt2, safetensors: {per_layer:.3f})" if per_layer is not None else ""
        return f"refused: reaches {job.refusal.reachable:.3f}{other}"
    if job.refusal is not None:  # the first clause: the rest names other output formats
        return f"refused: {str(job.refusal).split(';')[0]}"
    assert job.result is not None
    return f"{job.result.macs_after / job.result.macs_before:.3f}"


def row(job: FamilyJob) -> tuple[str, ...]:
    """`job` as a row of `docs/families.md` (see `HEADERS`)."""
    head = (job.name, f"`{job.config.model_type}`", job.model_class)
    if job.result is None:
        return (*head, "—", macs_reached(job), "—")
    reload_diff = job.result.exports["hf"].relative_diff
    assert reload_diff is not None, "an hf output is checked against the pruned module"
    return (
        *head,
        _moved(job.config, job.result.config_updates),
        macs_reached(job),
        _bucket(reload_diff),
    )


def _table_line(cells: tuple[str, ...]) -> str:
    assert all("|" not in cell for cell in cells), cells
    return "| " + " | ".join(cells) + " |"


def render(rows: list[tuple[str, ...]]) -> str:
    """The whole of `docs/families.md`."""
    return "\n".join(
        [
            "# Families",
            "",
            "One tiny random-weight model per Hugging Face family (`tests/worker/family_zoo.py`),",
            "uploaded as an `hf` folder and pruned by the job to half its MACs with an `hf`",
            "output (the method the zoo names for it, `oba` by default; 2 calibration batches",
            "of 4; seeded). This file is generated from that list by",
            "`tests/worker/family_jobs.py`, and `tests/worker/test_families.py`, which runs the",
            "same jobs, fails when a row here is not what its job does. The columns:",
            "",
            "- *what moved*: the config fields the job wrote that differ from the upload's",
            "  (before → after); *new* where the config did not state the field before.",
            "- *MACs with `hf`*: the fraction of the MACs the pruned model keeps (one example",
            "  row); or, for a family refused before pruning, the least fraction it can reach",
            "  with an `hf` output, or why the job refuses it.",
            "- *reload difference*: the job's own reload check of the `hf` output, the relative",
            "  difference of the reloaded model's outputs from the pruned model's: < 1e-6 (the",
            "  same numbers but for the last bits), < 1e-4 or ≥ 1e-4.",
            "",
            "How each family's config states its widths is in `docs/engine.md`,",
            "*Family descriptions*.",
            "",
            f"Regenerate after changing the zoo or the engine: `{COMMAND}`",
            "",
            _table_line(HEADERS),
            "|" + "|".join("---" for _ in HEADERS) + "|",
            *(_table_line(cells) for cells in rows),
            "",
        ]
    )


def documented(text: str | None = None) -> dict[str, tuple[str, ...]]:
    """The rows of `docs/families.md` (or of `text`) by family name."""
    lines = (DOCUMENT.read_text() if text is None else text).splitlines()
    start = lines.index(_table_line(HEADERS)) + 2
    rows: dict[str, tuple[str, ...]] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = tuple(cell.strip() for cell in line.strip().strip("|").split("|"))
        rows[cells[0]] = cells
    return rows


def stale_message(what: str) -> str:
    return f"docs/families.md is stale ({what}); regenerate it: {COMMAND}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Write docs/families.md from the family zoo.")
    parser.add_argument("--write", type=Path, required=True, help="the file to write")
    args = parser.parse_args()
    rows = []
    for name in FAMILIES:
        with tempfile.TemporaryDirectory() as folder:
            rows.append(row(run_job(Path(folder), name)))
        print(_table_line(rows[-1]), flush=True)
    args.write.write_text(render(rows))


if __name__ == "__main__":
    main()
