"""A job's result as people read it: what it reached against its target, before / after in
one table (a family: a column per member), and a search's candidates. `apoptosis prune` prints
them, and so do `jobs show`, `jobs report` and `jobs submit --wait`
(`service.cli.output.show_job`)."""

from rich.console import Console
from rich.table import Table

from service.jobs.results import Candidate, JobResult, Member
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


def candidates_table(candidates: list[Candidate], result: JobResult, member: str = "") -> Table:
    """A search's candidates, one row each in the order tried, the chosen one marked (`member`:
    the family member's target it searched for)."""
    title = "candidates (loss on the held-out rows)"
    table = Table(title=f"{member}: {title}" if member else title)
    headers = ("allocation", "MACs kept", "params kept", "after pruning", "after recovery", "")
    for header in headers:
        table.add_column(header, justify="left" if header == "allocation" else "right")
    for c in candidates:
        table.add_row(*candidate_cells(c, result))
    return table


def candidate_cells(candidate: Candidate, result: JobResult) -> tuple[str, ...]:
    """A candidate as read: its allocation, MACs and params kept, held-out loss after pruning
    and after recovery ("—" for one that dropped out), and whether it was chosen, went on
    without its recovery or missed the target."""

    def shown(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    c = candidate
    return (
        c.allocation,
        shown(None if c.macs is None else c.macs / result.macs_before, ".4f"),
        shown(None if c.params is None else c.params / result.params_before, ".4f"),
        shown(c.loss_after_pruning, ".4g"),
        shown(c.loss_after_recovery, ".4g")
        + (
            ""
            if c.accuracy_after_recovery is None
            else f", accuracy {c.accuracy_after_recovery:.4f}"
        ),
        ", ".join(
            note
            for note, holds in (
                ("chosen", c.chosen),
                ("recovery undone", c.recovery_kept is False),
                ("missed the target", c.missed is not None),
                (f"the model of candidate {c.same_as}", c.same_as is not None),
            )
            if holds
        ),
    )


def print_candidates(out: Console, result: JobResult) -> None:
    """Each search's candidates under the result's table, and why the chosen one won."""
    for member, candidates in result.searches:
        if len(candidates) < 2:
            continue
        out.print(candidates_table(candidates, result, member))
        why = next((c.why for c in candidates if c.chosen and c.why), None)
        if why is not None:
            out.print(f"chosen: {why}", soft_wrap=True, markup=False, highlight=False)


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
