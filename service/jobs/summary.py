"""A job's result as people read it: what it reached against its target, and before / after in
one table (a family: a column per member). `apoptosis prune` prints it, and so do `jobs show`,
`jobs report` and `jobs submit --wait` (`service.cli_output.show_job`)."""

from collections.abc import Mapping
from typing import Any

from rich.table import Table

from service.jobs.schemas import Target


def result_table(result: Mapping[str, Any]) -> Table:
    """Before and after, one column per model made: a family's members, or the one model after
    pruning (and after fine-tuning)."""
    family = result.get("family")
    columns: list[tuple[str, dict[str, Any], dict[str, Any]]] = []  # label, sizes, metrics
    for member in family or [result]:
        label = "after pruning"
        if family:
            label = ", ".join(f"{k} {v:g}" for k, v in member["target"].items())
        columns.append((label, member, member["after_pruning"]))
        if member.get("after_finetune"):
            tuned = f"{label}, fine-tuned" if family else "after fine-tuning"
            columns.append((tuned, member, member["after_finetune"]))
    table = Table()
    for header in ("metric", "before", *(label for label, _, _ in columns)):
        table.add_column(header, justify="left" if header == "metric" else "right")
    table.add_row(
        "MACs", f"{result['macs_before']:,}", *(f"{m['macs_after']:,}" for _, m, _ in columns)
    )
    table.add_row(
        "params", f"{result['params_before']:,}", *(f"{m['params_after']:,}" for _, m, _ in columns)
    )
    for key in ("loss", "accuracy", "latency_ms"):
        if key in result["before"]:
            values = (f"{metrics[key]:.4g}" if key in metrics else "" for _, _, metrics in columns)
            table.add_row(key, f"{result['before'][key]:.4g}", *values)
    return table


def reached(result: Mapping[str, Any], target: Target) -> str:
    """What the job reached against what it was asked, in one line."""
    if target.metric == "sparsity":
        return f"sparsity {result['sparsity']:.4f}, target {target.value:g}"
    if target.metric == "latency_ms":
        timing = result["latency"]
        return (
            f"{timing['after_ms']:.3g} ms at batch {timing['batch']}, target "
            f"{timing['target_ms']:g} ms: {timing['speedup']:.2f}× faster (noise "
            f"{timing['noise_ms']:.2g} ms), MACs kept {timing['macs_ratio']:.4f}"
        )
    family = result.get("family")
    metric = target.metric
    kept = ", ".join(
        f"{m[f'{metric}_after'] / result[f'{metric}_before']:.4f}" for m in family or [result]
    )
    if family:
        wanted = ", ".join(f"{m['target'][metric]:g}" for m in family)
        return f"{metric} kept {kept}, targets {wanted}"
    return f"{metric} kept {kept}, target {target.value:g}"
