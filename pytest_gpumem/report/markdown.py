"""A Markdown report fit for a pull-request comment (GitHub-flavoured)."""

from __future__ import annotations

from typing import Any

from ..sample import TestResult
from .table import COLUMNS, NUMERIC, UNITS_NOTE, cells, counts_line, notes, ordered

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


def _environment_line(environment: dict[str, Any]) -> str:
    parts = [f"backend `{environment.get('backend', '?')}`", f"hardware `{environment.get('hardware', '?')}`"]
    software = environment.get("software") or {}
    versions = [f"{name} {software[name]}" for name in SOFTWARE if software.get(name)]
    line = ", ".join(parts)
    return f"{line}; {', '.join(versions)}" if versions else line


def render(results: list[TestResult], environment: dict[str, Any], warn_only: bool = False) -> str:
    """The whole comment: heading, environment line, table (failures first), notes, units footnote."""
    lines = [_heading(results, warn_only), "", _environment_line(environment)]
    if results:
        lines += ["", "| " + " | ".join(COLUMNS) + " |"]
        lines.append("| " + " | ".join("---:" if c in NUMERIC else "---" for c in COLUMNS) + " |")
        for result in ordered(results):
            row = cells(result, warn_only)
            row[0] = _code(row[0])
            if result.verdict.failed:
                row[-1] = f"**{row[-1]}**"
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
        bullets = notes(results, warn_only)
        if not any(r.verdict.failed for r in results):
            bullets.insert(0, counts_line(results))  # the heading carries the counts only when something failed
        if bullets:
            lines += [""] + [f"- {bullet}" for bullet in bullets]
        lines += ["", UNITS_NOTE]
    return "\n".join(lines) + "\n"
