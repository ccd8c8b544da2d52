"""The job report as a self-contained HTML page: before/after bars drawn as inline SVG, no
scripts and no external assets, every value escaped."""

from html import escape

from service.jobs.results import Candidate, JobResult, Metrics
from service.jobs.schemas import JobReport
from service.jobs.summary import candidate_cells

BAR_WIDTH = 360
METRICS = ("latency_ms", "loss", "accuracy")


def render(report: JobReport) -> str:
    sections = [
        f"<h1>Job {escape(report.job_id)}</h1>",
        f"<p>State: <b>{escape(report.state)}</b></p>",
    ]
    if report.error:
        sections.append(
            f"<p>Error <code>{escape(report.error.code)}</code>: {escape(report.error.message)}</p>"
        )
    if report.result:
        sections += _result(report.result)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Apoptosis report</title>"
        "<style>body{font-family:sans-serif;max-width:760px;margin:2em auto}"
        "td,th{padding:2px 12px;text-align:left}</style></head><body>"
        + "".join(sections)
        + "</body></html>"
    )


def _result(result: JobResult) -> list[str]:
    sections = []
    bars: list[tuple[str, float | None, float | None]] = [
        ("MACs", result.macs_before, result.macs_after),
        ("Parameters", result.params_before, result.params_after),
    ]
    last = result.after_finetune or result.after_pruning
    bars += [(m, getattr(result.before, m), getattr(last, m)) for m in METRICS]
    charts = [
        _bar_chart(label, before, after)
        for label, before, after in bars
        if before is not None and after is not None
    ]
    if charts:
        sections.append("<h2>Before → after</h2>" + "".join(charts))
    if result.family:
        sections.append(_family(result))
    sections += [
        _candidates(result, candidates, member)
        for member, candidates in result.searches
        if len(candidates) > 1
    ]
    if result.widths:
        rows = "".join(
            f"<tr><td>{escape(k)}</td><td>{v}</td></tr>" for k, v in sorted(result.widths.items())
        )
        sections.append(
            f"<h2>Widths</h2><table><tr><th>layer</th><th>width</th></tr>{rows}</table>"
        )
    if result.seconds:
        rows = "".join(
            f"<tr><td>{escape(k)}</td><td>{v:.2f} s</td></tr>" for k, v in result.seconds.items()
        )
        sections.append(f"<h2>Time per stage</h2><table>{rows}</table>")
    return sections


def _family(result: JobResult) -> str:
    """The trade-off of a family: size against quality and speed, one row and bar per target."""
    members = result.members
    names = [", ".join(f"{k} {v:g}" for k, v in m.target.items()) for m in members]
    measured: list[Metrics] = [m.after_finetune or m.after_pruning for m in members]
    columns: list[tuple[str, list[float]]] = [
        ("MACs kept", [m.macs_after / result.macs_before for m in members]),
        ("params kept", [m.params_after / result.params_before for m in members]),
    ]
    for metric in ("loss", "accuracy", "latency_ms"):
        values = [getattr(m, metric) for m in measured]
        if all(value is not None for value in values):
            columns.append((metric, values))
    head = "".join(f"<th>{escape(label)}</th>" for label, _ in columns)
    rows = "".join(
        f"<tr><td>{escape(name)}</td>"
        + "".join(f"<td>{float(values[row]):.4g}</td>" for _, values in columns)
        + "</tr>"
        for row, name in enumerate(names)
    )
    charts = "".join(_bars(label, names, values) for label, values in columns[2:])
    return (
        "<h2>The family: size against quality and speed</h2>"
        f"<table><tr><th>target</th>{head}</tr>{rows}</table>{charts}"
    )


def _candidates(result: JobResult, candidates: list[Candidate], member: str) -> str:
    """A search's candidates in the order tried, and why the chosen one won (`member`: the
    family member's target it searched for)."""
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{escape(cell)}</td>" for cell in candidate_cells(c, result))
        + "</tr>"
        for c in candidates
    )
    why = "".join(f"<p>{escape(c.why)}</p>" for c in candidates if c.chosen and c.why)
    why += "".join(
        f"<p>{escape(c.allocation)}: {escape(c.missed)}</p>"
        for c in candidates
        if c.missed is not None
    )
    widths = "".join(
        f"<tr><td>{escape(c.allocation)}</td><td>"
        + escape(", ".join(f"{k} {v}" for k, v in sorted(c.widths.items())))
        + "</td></tr>"
        for c in candidates
    )
    return (
        f"<h2>{escape(member + ': ') if member else ''}Candidates: measured on the held-out rows "
        "after pruning and after recovery</h2>"
        "<table><tr><th>allocation</th><th>MACs kept</th><th>params kept</th>"
        f"<th>after pruning</th><th>after recovery</th><th></th></tr>{rows}</table>{why}"
        f"<h3>Their widths</h3><table>{widths}</table>"
    )


def _bars(label: str, names: list[str], values: list[float]) -> str:
    top = max(abs(v) for v in values) or 1.0
    bars = ""
    for row, (name, value) in enumerate(zip(names, values, strict=True)):
        width = BAR_WIDTH * abs(value) / top
        y = 4 + 22 * row
        bars += (
            f"<rect x='110' y='{y}' width='{width:.1f}' height='18' fill='#2a7'/>"
            f"<text x='0' y='{y + 14}'>{escape(name)}</text>"
            f"<text x='{116 + width:.1f}' y='{y + 14}'>{value:.4g}</text>"
        )
    height = 8 + 22 * len(values)
    return (
        f"<h3>{escape(label)}</h3><svg width='{BAR_WIDTH + 210}' height='{height}' role='img' "
        f"aria-label='{escape(label)} per target'>{bars}</svg>"
    )


def _bar_chart(label: str, before: float, after: float) -> str:
    top = max(abs(before), abs(after)) or 1.0
    bars = ""
    for row, (name, value, colour) in enumerate(
        (("before", before, "#999"), ("after", after, "#2a7"))
    ):
        width = BAR_WIDTH * abs(value) / top
        y = 4 + 22 * row
        bars += (
            f"<rect x='60' y='{y}' width='{width:.1f}' height='18' fill='{colour}'/>"
            f"<text x='0' y='{y + 14}'>{name}</text>"
            f"<text x='{66 + width:.1f}' y='{y + 14}'>{value:.4g}</text>"
        )
    ratio = f" ({after / before:.2f}×)" if before else ""
    return (
        f"<h3>{escape(label)}{ratio}</h3><svg width='{BAR_WIDTH + 160}' height='52' "
        f"role='img' aria-label='{escape(label)}'>{bars}</svg>"
    )
