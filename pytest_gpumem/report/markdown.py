"""A Markdown report fit for a pull-request comment (GitHub-flavoured)."""

from __future__ import annotations

import html
from typing import Any

from pytest_gpumem.core.sample import TestResult
from pytest_gpumem.report.table import (
    COLUMNS,
    DEVICE_COLUMNS,
    NUMERIC,
    UNITS_NOTE,
    attribution_rows,
    cells,
    counts_line,
    current_attribution,
    decided_on,
    delta_cell,
    device_rows,
    explained,
    fit_text,
    lever_text,
    notes,
    oom_lines,
    ordered,
    plural,
    recommendation,
    status_word,
    verdict_cell,
    where,
)

_VERDICT = COLUMNS.index("verdict")

SOFTWARE = ("torch", "transformers", "peft", "bitsandbytes")
"""The packages named in the report's environment line, in this order, where installed."""


def _cell(text: str) -> str:
    """A pipe would end the cell, even inside a code span; GFM reads ``\\|`` as a literal pipe."""
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _heading(results: list[TestResult], warn_only: bool) -> str:
    if not results:
        return "### gpumem: no tests measured"
    if not any(r.verdict.failed for r in results):
        return f"### gpumem: all {len(results)} within budget and baseline"
    suffix = " (not enforced)" if warn_only else ""
    return f"### gpumem: {counts_line(results)}{suffix}"


def _joined(value: Any) -> str:
    """A report's environment holds lists (``backends``, ``hardware``): several after a merge."""
    return ", ".join(value) if isinstance(value, list) else str(value)


def _environment_line(environment: dict[str, Any]) -> str:
    backends = environment.get("backends", environment.get("backend")) or "?"
    hardware = environment.get("hardware") or "?"
    parts = [f"backend `{_joined(backends)}`", f"hardware `{_joined(hardware)}`"]
    software = environment.get("software") or {}
    versions = [f"{name} {software[name]}" for name in SOFTWARE if software.get(name)]
    line = ", ".join(parts)
    return f"{line}; {', '.join(versions)}" if versions else line


def _dependencies(results: list[TestResult], warn_only: bool) -> list[str]:
    """The comment's lead when libraries changed since the baselines: what changed, and what it cost each test.

    Library upgrades are where memory regressions come from most often, so a pull request that bumps torch
    or transformers (by hand or by a bot) is told first what changed and what that did to every test it
    touched; the verdicts are the judge's, and a regression fails as it would after any other change.
    """
    groups: dict[tuple[str, ...], list[TestResult]] = {}
    for result in ordered(results):
        if result.verdict.software_changes:
            groups.setdefault(tuple(result.verdict.software_changes), []).append(result)
    lines = []
    for changes, changed in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        scope = f" ({plural(len(changed), 'test')})" if len(groups) > 1 else ""
        lines += [f"**Dependencies changed** since the baselines{scope}: {_cell('; '.join(changes))}", ""]
        lines += ["| test | metric | cost | verdict |", "| --- | --- | ---: | --- |"]
        for result in changed:
            verdict = verdict_cell(result.verdict, warn_only)
            verdict = f"**{verdict}**" if result.verdict.failed else verdict
            cost = delta_cell(result.verdict)
            lines.append(f"| {_cell(_code(result.nodeid))} | {result.verdict.metric} | {_cell(cost)} | {verdict} |")
        lines.append("")
    return lines


def _table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---:" if c in NUMERIC else "---" for c in columns) + " |",
    ]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _explanation(result: TestResult) -> list[str]:
    """A collapsible block: the test's devices (where it measured several), where its peak went beside its
    baseline's (or how it ran out of memory, and what was alive then), findings, levers, and the searches for
    what fits."""
    verdict = result.verdict
    attribution = current_attribution(result)
    oom = verdict.oom
    moment = "out of memory" if oom is not None else "peak"
    parts = [f"{status_word(verdict.status)} on {decided_on(verdict)}"] if decided_on(verdict) else []
    if attribution:
        parts.append(f"{moment} at {where(attribution)}")
    # Markdown is not rendered inside an HTML block, so the summary is HTML throughout.
    summary = f"<code>{html.escape(result.nodeid)}</code>" + (f": {html.escape('; '.join(parts))}" if parts else "")
    lines = [f"<details><summary>{summary}</summary>", ""]
    if verdict.devices:
        lines += [*_table(DEVICE_COLUMNS, device_rows(verdict)), ""]
    if oom is not None:
        lines += [f"- {label}: {_cell(text)}" for label, text in oom_lines(oom)]
        lines.append("")
    rows = attribution_rows(result)
    if rows:
        lines += [*_table(("consumer", "baseline", "now", "delta"), rows), ""]
    advice = result.advice
    if advice is not None:
        lines += [f"- setting: {_cell(finding)}" for finding in advice.findings]
        for lever in advice.levers:
            mark = " **(recommended)**" if lever.key in advice.recommended else ""
            basis = f" — {lever.basis}" if lever.basis else ""
            lines.append(f"- {lever_text(lever)}{basis}{mark}")
        if recommendation(advice):
            lines.append(f"- **{recommendation(advice)}**")
        if advice.replay:
            lines.append(f"- replay: {_cell(advice.replay)}")
        lines.append("")
    if result.fits:
        lines += [f"- {'fit' if fit.purpose else 'retry'}: {_cell(fit_text(fit))}" for fit in result.fits]
        lines.append("")
    lines.append("</details>")
    return lines


def render(results: list[TestResult], environment: dict[str, Any], warn_only: bool = False) -> str:
    """The whole comment: heading, environment line, table (failures first), notes, units footnote."""
    lines = [_heading(results, warn_only), "", *_dependencies(results, warn_only), _environment_line(environment)]
    if results:
        lines += ["", "| " + " | ".join(COLUMNS) + " |"]
        lines.append("| " + " | ".join("---:" if c in NUMERIC else "---" for c in COLUMNS) + " |")
        for result in ordered(results):
            row = cells(result, warn_only)
            row[0] = _code(row[0])
            if result.verdict.failed:
                row[_VERDICT] = f"**{row[_VERDICT]}**"
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
        bullets = notes(results, warn_only)
        if not any(r.verdict.failed for r in results):
            bullets.insert(0, counts_line(results))  # the heading carries the counts only when something failed
        if bullets:
            lines += [""] + [f"- {bullet}" for bullet in bullets]
        for result in ordered(results):
            if explained(result) or decided_on(result.verdict):
                lines += ["", *_explanation(result)]
        lines += ["", UNITS_NOTE]
    return "\n".join(lines) + "\n"
