"""The history report: per-test trends and steps as text, and a plot as PNG and as one HTML file.

The plot shows one line per test and metric over the runs (labelled by
commit), one panel per metric, with each step's first commit marked. The HTML
file carries the plot as inline SVG and the two tables, with nothing loaded
from elsewhere, so it can be uploaded as a CI artifact and opened as it is.
matplotlib is needed for the plot only (the ``history`` extra); it is used
through its object API, so no global pyplot state is touched.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_gpumem.ci.history import EXTRA_HINT, HistoryError, Series, Step, Trend
from pytest_gpumem.core.atomic import write_atomic
from pytest_gpumem.core.sample import METRICS
from pytest_gpumem.core.units import format_bytes, format_delta, format_percent

TREND_COLUMNS = ("test", "metric", "hardware", "runs", "first", "last", "change", "min", "max")
_MAX_TICKS = 24

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def trend_rows(trends: Sequence[Trend]) -> list[list[str]]:
    """One row of :data:`TREND_COLUMNS` cells per series."""
    rows = []
    for t in trends:
        percent = format_percent(t.change, t.first)
        change = format_delta(t.change) + ("" if percent == "-" else f" ({percent})")
        s = t.series
        rows.append(
            [
                s.nodeid,
                s.metric,
                s.hardware,
                str(t.runs),
                format_bytes(t.first),
                format_bytes(t.last),
                change,
                format_bytes(t.low),
                format_bytes(t.high),
            ]
        )
    return rows


def step_line(step: Step) -> str:
    """``t.py::a (allocated, cpu): up +64.00 MiB (+6.2%) at abc1234 (2026-01-02T...): 1.00 GiB -> 1.06 GiB``."""
    direction = "up" if step.delta > 0 else "down"
    percent = format_percent(step.delta, step.before)
    change = format_delta(step.delta) + ("" if percent == "-" else f" ({percent})")
    where = step.commit[:12] or "(no commit)"
    return (
        f"{step.series.label}: {direction} {change} at {where} ({step.time}): "
        f"{format_bytes(step.before)} -> {format_bytes(step.after)}"
    )


def text_lines(trends: Sequence[Trend], steps: Sequence[Step]) -> list[str]:
    """The terminal report: an aligned trend table, then the steps (or a line saying there are none)."""
    if not trends:
        return ["no runs in the history"]
    table = [list(TREND_COLUMNS), *trend_rows(trends)]
    widths = [max(len(row[i]) for row in table) for i in range(len(TREND_COLUMNS))]
    right = [i >= 3 for i in range(len(TREND_COLUMNS))]

    def line(row: list[str]) -> str:
        cells = (c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True))
        return "  ".join(cells).rstrip()

    lines = [line(table[0]), line(["-" * w for w in widths]), *(line(row) for row in table[1:])]
    lines.append("")
    if steps:
        lines.append(f"steps ({len(steps)}): the first commit of each new level")
        lines += [f"  {step_line(step)}" for step in steps]
    else:
        lines.append("steps: none (no sustained change beyond the tolerance)")
    return lines


# -- the plot


def _runs(series: Sequence[Series]) -> list[tuple[str, str]]:
    """Every run as ``(time, commit)``, oldest first: the plot's x axis."""
    return sorted({(p.time, p.commit) for s in series for p in s.points})


def _key(s: Series) -> tuple[str, ...]:
    return (s.hardware, s.backend, s.nodeid, s.metric)


def _unit(series: Sequence[Series]) -> tuple[str, int]:
    largest = max((p.value for s in series for p in s.points), default=0)
    return ("GiB", 2**30) if largest >= 2**30 else ("MiB", 2**20) if largest >= 2**20 else ("KiB", 2**10)


def figure(series: Sequence[Series], steps: Sequence[Step]) -> Figure:
    """A matplotlib Figure: one panel per metric, one line per test, steps marked and labelled."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise HistoryError(f"the history plot needs matplotlib, which is not installed: {EXTRA_HINT}") from None

    runs = _runs(series)
    x_of = {run: i for i, run in enumerate(runs)}
    metrics = [m for m in METRICS if any(s.metric == m for s in series)]
    metrics += sorted({s.metric for s in series} - set(metrics))
    panels = max(len(metrics), 1)
    fig = Figure(figsize=(11, 3.6 * panels + 0.3 * len(series)), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False, sharex=True)[:, 0]
    unit, scale = _unit(series)
    labels = [commit[:7] or time[:10] for time, commit in runs]
    ticks = list(range(len(runs)))
    if len(ticks) > _MAX_TICKS:  # keep the labels readable: every k-th run, and always the last
        every = -(-len(ticks) // _MAX_TICKS)
        ticks = ticks[::every] + ([ticks[-1]] if ticks[-1] % every else [])
    by_series: dict[tuple[str, ...], list[Step]] = {}
    for step in steps:
        by_series.setdefault(_key(step.series), []).append(step)

    for ax, metric in zip(axes, metrics or ["allocated"], strict=True):
        for s in (s for s in series if s.metric == metric):
            xs = [x_of[(p.time, p.commit)] for p in s.points]
            ys = [p.value / scale for p in s.points]
            name = s.nodeid if len({x.hardware for x in series}) == 1 else f"{s.nodeid} [{s.hardware}]"
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, label=name)
            for step in by_series.get(_key(s), []):
                x, y = xs[step.index], ys[step.index]
                ax.plot([x], [y], marker="^" if step.delta > 0 else "v", markersize=11, color="crimson", zorder=5)
                ax.annotate(
                    f"{step.commit[:7] or '?'} {format_delta(step.delta)}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(6, 8),
                    fontsize=8,
                    color="crimson",
                )
        ax.set_ylim(bottom=0)  # from zero, so that a line's rise reads as its share of the peak
        ax.margins(y=0.15)  # room for the step labels
        ax.set_title(f"peak {metric} per run", loc="left", fontsize=10)
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes[-1].set_xticks(ticks, [labels[i] for i in ticks], rotation=45, ha="right", fontsize=8)
    axes[-1].set_xlabel("commit (oldest run left); marked: the first commit of a sustained step")
    return fig


def write_png(fig: Figure, path: Path) -> None:
    """The figure as a PNG file, written whole (see :mod:`..atomic`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())


def svg(fig: Figure) -> str:
    """The figure as an inline ``<svg>`` element (the XML prolog and doctype left out)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{html.escape(c)}</td>' if i >= numeric_from else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(fig: Figure, trends: Sequence[Trend], steps: Sequence[Step], source: str) -> str:
    """One self-contained HTML page: the plot (inline SVG), the steps and the trends."""
    step_items = "".join(f"<li><code>{html.escape(step_line(s))}</code></li>" for s in steps)
    steps_html = f"<ul>{step_items}</ul>" if steps else "<p>No sustained change beyond the tolerance.</p>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>gpumem history</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
svg {{ max-width: 100%; height: auto; }}
</style>
</head>
<body>
<h1>gpumem history</h1>
<p>From <code>{html.escape(source)}</code>. Sizes in binary units (1 GiB = 2<sup>30</sup> bytes).</p>
{svg(fig)}
<h2>Steps</h2>
{steps_html}
<h2>Trends</h2>
{_table(TREND_COLUMNS, trend_rows(trends), 3)}
</body>
</html>
"""
