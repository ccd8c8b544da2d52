"""A job's result as people read it: what it reached against its target, and before / after in
one table (a family: a column per member). `apoptosis prune` prints it, and so do `jobs show`,
`jobs report` and `jobs submit --wait` (`service.cli.output.show_job`)."""

from rich.table import Table

from service.jobs.results import JobResult, Member
from service.jobs.schemas import Target

METRICS = ("loss", "accuracy", "latency_ms")


def result_table(result: JobResult) -> Table:
    """Before and after, one column per model made: a family's members, or the one model after
    pruning (and after fine-tuning)."""
    family = bool(result.family)
    columns: list[tuple[str, Member, dict[str, float]]] = []  # label, sizes, metrics
    for member in result.members:
        label = "after pruning"
        if family:
            label = ", ".join(f"{k} {v:g}" for k, v in member.target.items())
        columns.append((label, member, member.after_pruning.model_dump()))
        if member.after_finetune:
            tuned = f"{label}, fine-tuned" if family else "after fine-tuning"
            columns.append((tuned, member, member.after_finetune.model_dump()))
    table = Table()
    for header in ("metric", "before", *(label for label, _, _ in columns)):
        table.add_column(header, justify="left" if header == "metric" else "right")
    table.add_row("MACs", f"{result.macs_before:,}", *(f"{m.macs_after:,}" for _, m, _ in columns))
    table.add_row(
        "params", f"{result.params_before:,}", *(f"{m.params_after:,}" for _, m, _ in columns)
    )
    before = result.before.model_dump()
    for key in METRICS:
        if key in before:
            values = (f"{metrics[key]:.4g}" if key in metrics else "" for _, _, metrics in columns)
            table.add_row(key, f"{before[key]:.4g}", *values)
    return table


def reached(result: JobResult, target: Target) -> str:
    """What the job reached against what it was asked, in one line."""
    if target.metric == "sparsity":
        return f"sparsity {result.sparsity or 0:.4f}, target {target.value:g}"
    if target.metric == "latency_ms":
        timing = result.latency
        assert timing is not None, "a latency job's result carries its timings"
        return (
            f"{timing.after_ms:.3g} ms at batch {timing.batch}, target "
            f"{timing.target_ms:g} ms: {timing.speedup:.2f}× faster (noise "
            f"{timing.noise_ms:.2g} ms), MACs kept {timing.macs_ratio:.4f}"
        )
    metric = target.metric
    before = result.macs_before if metric == "macs" else result.params_before
    kept = ", ".join(
        f"{(m.macs_after if metric == 'macs' else m.params_after) / before:.4f}"
        for m in result.members
    )
    if result.family:
        wanted = ", ".join(f"{m.target[metric]:g}" for m in result.family)
        return f"{metric} kept {kept}, targets {wanted}"
    return f"{metric} kept {kept}, target {target.value:g}"
