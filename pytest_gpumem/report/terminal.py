"""Plain-text reports for the terminal: a failed test's message and the session's summary table."""

from __future__ import annotations

from pytest_gpumem.core.sample import Leak, TestResult
from pytest_gpumem.core.units import format_bytes, format_delta
from pytest_gpumem.report.table import (
    COLUMNS,
    DEVICE_COLUMNS,
    NUMERIC,
    ORDER,
    UNITS_NOTE,
    UPDATE_OPTION,
    attribution_rows,
    cells,
    counts_line,
    current_attribution,
    decided_on,
    delta_cell,
    device_rows,
    explained,
    fit_text,
    grown_consumer,
    leak_text,
    lever_text,
    notes,
    oom_lines,
    ordered,
    recommendation,
    rerun_text,
    top_lever,
    where,
)

__all__ = ["ORDER", "failure_message", "leak_message", "summary_lines"]

_HEADLINE = {"regression": "regression over baseline", "over_budget": "over budget", "oom": "out of memory"}


def _exact(n: int | None) -> str:
    """``1.50 GiB (1610612736 B)``: readable, and exact for comparing by hand."""
    return "-" if n is None else f"{format_bytes(n)} ({n} B)"


def _versions(software: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in sorted(software.items()))


def failure_message(result: TestResult) -> str:
    """The block shown as a failed test's longrepr: the verdict and every number that decided it."""
    v = result.verdict
    sample = result.sample
    headline = _HEADLINE.get(v.status, v.status)
    if decided_on(v):
        headline += f" on {v.device}"
    lines = [f"gpumem: {headline} ({v.metric} peak, {sample.backend} backend, hardware {result.hardware})"]

    def add(label: str, text: str) -> None:
        lines.append(f"  {label:<8}  {text}")

    if v.oom is not None:
        for label, text in oom_lines(v.oom):
            add(label, text)
    row = v.row()  # the deciding device's, on several devices
    add("peak", _exact(v.value) + (f" on {v.device}" if row else ""))

    if v.baseline is None:
        text = "none for this hardware"
        if v.other_hardware:
            text += f"; baselines exist for: {', '.join(v.other_hardware)}"
        add("baseline", text)
    else:
        # a device the baseline lacks is compared with 0: say so rather than show a recorded 0
        missing = row is not None and not row.in_baseline
        text = f"0 B: {v.device} is not in the baseline" if missing else _exact(v.baseline)
        if result.baseline is not None:
            if result.baseline.recorded:
                text += f" recorded {result.baseline.recorded}"
            if result.baseline.software:
                text += f" with {_versions(result.baseline.software)}"
        add("baseline", text)
        text = delta_cell(v)
        if v.allowed is not None:
            # the tolerance applies both ways; show it on the side the value moved to
            allowed = -v.allowed if (v.delta or 0) < 0 else v.allowed
            tolerance = f" {v.tolerance}" if v.tolerance else ""
            text += f", tolerance{tolerance} allows {format_delta(allowed)}"
        add("delta", text)

    if v.budget is not None:
        text = format_bytes(v.budget)
        if v.value is not None and v.value > v.budget:
            text += f", exceeded by {format_bytes(v.value - v.budget)}"
        add("budget", text)
    if v.devices:
        lines.append("  devices")
        lines += _aligned(list(DEVICE_COLUMNS), device_rows(v), _numeric(DEVICE_COLUMNS), indent="    ")

    phases = [(phase, sample.value(v.metric, phase)) for phase in sample.phases]
    measured = [f"{phase} {format_bytes(value)}" for phase, value in phases if value is not None]
    if measured:
        add("phases", ", ".join(measured))

    attribution = current_attribution(result)
    if attribution is not None:
        add("at", where(attribution))
    if rerun_text(result):
        add("rerun", rerun_text(result))
    grown = grown_consumer(result)
    if grown:
        add("grew", grown)
    advice = result.advice
    if advice is not None and advice.findings:
        add("setting", advice.findings[0])
    lever = top_lever(advice)
    if lever is not None:
        add("lever", lever_text(lever))
    if advice is not None and recommendation(advice):
        add("advice", recommendation(advice))
    if advice is not None and advice.replay:
        add("replay", advice.replay)
    for fit in result.fits:
        add("fit" if fit.purpose else "retry", fit_text(fit))

    if v.software_changes:
        add("software", "changed since the baseline: " + "; ".join(v.software_changes))
    if result.snapshot:
        add("snapshot", f"{result.snapshot} (open it at https://pytorch.org/memory_viz)")

    if v.status == "improved":
        add("hint", f"shrank beyond tolerance: re-record with {UPDATE_OPTION}")
    return "\n".join(lines)


def leak_message(leak: Leak) -> str:
    """The line for a test that left memory alive: a warning, or a teardown error over a set limit."""
    return f"gpumem: leak: the test {leak_text(leak)}"


def _numeric(columns: tuple[str, ...]) -> list[bool]:
    return [c in NUMERIC for c in columns]


def _aligned(header: list[str], rows: list[list[str]], numeric: list[bool], indent: str = "") -> list[str]:
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def line(row: list[str]) -> str:
        padded = (c.rjust(w) if right else c.ljust(w) for c, w, right in zip(row, widths, numeric, strict=True))
        return (indent + "  ".join(padded)).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(row) for row in rows]


def explanation_lines(result: TestResult) -> list[str]:
    """A test's full explanation: its devices' numbers (where it measured several), where its peak went
    (beside the baseline's), or what was alive when it ran out of memory, findings and every lever."""
    attribution = current_attribution(result)
    advice = result.advice
    lines = [f"{result.nodeid}:"]
    if result.verdict.devices:
        lines += _aligned(list(DEVICE_COLUMNS), device_rows(result.verdict), _numeric(DEVICE_COLUMNS), indent="  ")
    if attribution is not None:
        moment = "out of memory" if result.verdict.oom is not None else "peak"
        lines.append(f"  {moment} at {where(attribution)}")
        if rerun_text(result):
            lines.append(f"  {rerun_text(result)}")
        rows = attribution_rows(result)
        lines += _aligned(["consumer", "baseline", "now", "delta"], rows, [False, True, True, True], indent="  ")
    if advice is not None:
        lines += [f"  setting: {finding}" for finding in advice.findings]
        if advice.levers:
            lines.append("  levers, in order of cost to quality:")
            for lever in advice.levers:
                mark = "  <- recommended" if lever.key in advice.recommended else ""
                basis = f" [{lever.basis}]" if lever.basis else ""
                lines.append(f"    {lever_text(lever)}{basis}{mark}")
        if recommendation(advice):
            lines.append(f"  {recommendation(advice)}")
        if advice.replay:
            lines.append(f"  replay: {advice.replay}")
    return lines


def summary_lines(results: list[TestResult], warn_only: bool = False, updating: bool = False) -> list[str]:
    """The terminal summary: an aligned table, failures first, then the explanation of every failed or
    advised test (and of every test decided on one of several devices), notes and a count line."""
    if not results:
        return ["no tests measured"]
    lines = _aligned(list(COLUMNS), [cells(r, warn_only) for r in ordered(results)], _numeric(COLUMNS))
    for result in ordered(results):
        if explained(result) or decided_on(result.verdict):
            lines += explanation_lines(result)
    lines += notes(results, warn_only, updating)
    lines.append(UNITS_NOTE)
    lines.append(counts_line(results))
    return lines
