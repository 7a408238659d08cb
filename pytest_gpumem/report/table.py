"""What every reporter shows, as plain strings: row cells, ordering, counts and notes.

The terminal and Markdown reporters differ only in layout; the words and
numbers they show come from here, so the two cannot drift apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from ..sample import CONSUMERS, FAILING, Advice, Attribution, Breakdown, Lever, TestResult, Verdict
from ..units import format_bytes, format_delta, format_percent

COLUMNS = ("test", "metric", "peak", "baseline", "delta", "budget", "verdict", "largest consumer")
NUMERIC = frozenset({"peak", "baseline", "delta", "budget"})
"""Columns that hold sizes, so layouts right-align them."""

UPDATE_OPTION = "--gpumem-update-baselines"
UNITS_NOTE = "sizes in binary units (1 GiB = 2^30 bytes)"

_RANK = {status: rank for rank, status in enumerate(("oom", "over_budget", "regression", "improved", "new", "ok"))}
_COUNT_ORDER = ("regression", "over_budget", "oom", "improved", "new", "ok")
_SINGULAR = {"regression": "regression", "over_budget": "over budget", "oom": "out of memory"}
_PLURAL = {"regression": "regressions", "over_budget": "over budget", "oom": "out of memory"}


def _sort_key(result: TestResult) -> tuple[int, int, str]:
    delta = result.verdict.delta
    return (_RANK.get(result.verdict.status, len(_RANK)), -abs(delta) if delta is not None else 0, result.nodeid)


ORDER: Callable[[TestResult], tuple[int, int, str]] = _sort_key
"""Sort key: oom, over_budget, regression, improved, new, ok; then larger |delta| first; then nodeid."""


def plural(count: int, word: str) -> str:
    """``1 test``, ``3 tests``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def status_word(status: str) -> str:
    """The short word for a status in tables: ``over budget``, ``oom``, ``regression``."""
    return status.replace("_", " ")


def verdict_cell(verdict: Verdict, warn_only: bool = False) -> str:
    """The verdict column: ``regression``, or ``regression (warn)`` for an unenforced failure."""
    word = status_word(verdict.status)
    return f"{word} (warn)" if warn_only and verdict.failed else word


def delta_cell(verdict: Verdict) -> str:
    """``+12.00 MiB (+0.8%)``; ``-`` without a baseline."""
    delta = verdict.delta
    if delta is None:
        return "-"
    percent = format_percent(delta, verdict.baseline)
    return format_delta(delta) if percent == "-" else f"{format_delta(delta)} ({percent})"


def cells(result: TestResult, warn_only: bool = False) -> list[str]:
    """One row's cells, in :data:`COLUMNS` order."""
    v = result.verdict
    return [
        result.nodeid,
        v.metric,
        format_bytes(v.value),
        format_bytes(v.baseline),
        delta_cell(v),
        format_bytes(v.budget),
        verdict_cell(v, warn_only),
        largest_consumer(result.sample.attribution),
    ]


# -- attribution and advice


LEVER_NAMES = {
    "fix": "fix a setting",
    "batch": "smaller batch + accumulation",
    "checkpointing": "gradient checkpointing",
    "seq": "shorter max_seq_length",
    "bf16": "bf16 mixed precision",
    "lora": "LoRA instead of full fine-tuning",
    "qlora": "4-bit QLoRA",
    "rank": "lower LoRA rank / fewer targets",
    "optimizer": "8-bit optimizer",
}


def _consumers(breakdown: Breakdown) -> dict[str, int]:
    return {name: getattr(breakdown, name) for name in CONSUMERS}


def largest_consumer(attribution: Attribution | None) -> str:
    """``activations 61%``: the consumer that held most of the peak; ``-`` without an attribution."""
    if attribution is None or attribution.peak.total <= 0:
        return "-"
    name, value = max(_consumers(attribution.peak).items(), key=lambda item: item[1])
    return f"{name} {100 * value / attribution.peak.total:.0f}%"


def where(attribution: Attribution) -> str:
    """When and where the peak happened: ``step2, backward (LogSoftmaxBackward0) on cuda:0``."""
    parts = [part for part in (attribution.phase, attribution.stage) if part]
    text = ", ".join(parts) or "the call"
    if attribution.module:
        text += f" ({attribution.module})"
    return f"{text} on {attribution.device}" if attribution.device else text


def attribution_rows(result: TestResult) -> list[list[str]]:
    """Rows of ``consumer, baseline, now, delta``: the four consumers, then the allocator's cache and the
    memory outside it where measured. The baseline column is ``-`` where the baseline has no attribution."""
    now = result.sample.attribution
    if now is None:
        return []
    before = result.baseline.attribution if result.baseline else None
    values = _consumers(now.peak)
    old = _consumers(before.peak) if before else {}
    extra = (
        ("allocator cache (reserved - allocated)", "fragmentation"),
        ("outside the allocator (context, workspaces)", "context"),
    )
    for label, name in extra:
        if getattr(now, name) or (before and getattr(before, name)):
            values[label] = getattr(now, name)
            if before:
                old[label] = getattr(before, name)
    rows = []
    for name, value in values.items():
        base = old.get(name)
        delta = format_delta(value - base) if base is not None else "-"
        rows.append([name, format_bytes(base), format_bytes(value), delta])
    return rows


def grown_consumer(result: TestResult) -> str | None:
    """``activations +1.20 GiB (1.90 GiB -> 3.10 GiB)``: the consumer that grew most since the baseline."""
    now = result.sample.attribution
    before = result.baseline.attribution if result.baseline else None
    if now is None or before is None:
        return None
    old = _consumers(before.peak)
    name, value = max(_consumers(now.peak).items(), key=lambda item: item[1] - old[item[0]])
    growth = value - old[name]
    if growth <= 0:
        return None
    return f"{name} {format_delta(growth)} ({format_bytes(old[name])} -> {format_bytes(value)})"


def lever_text(lever: Lever) -> str:
    """``gradient checkpointing: gradient_checkpointing on; saves 1.10 GiB (measured)``."""
    if lever.saving > 0:
        effect = f"saves {format_bytes(lever.saving)}"
    elif lever.saving == 0:
        effect = "saves nothing here"
    else:
        effect = f"costs {format_bytes(-lever.saving)} more"
    return f"{LEVER_NAMES.get(lever.key, lever.key)}: {lever.action}; {effect} ({lever.source})"


def recommendation(advice: Advice) -> str:
    """The advice in one line: the recommended lever(s) and what they free against what is needed."""
    chosen = [lever for lever in advice.levers if lever.key in advice.recommended]
    if advice.needed is None:
        return ""
    if not chosen:
        return f"no lever found that frees the {format_bytes(advice.needed)} needed"
    total = sum(lever.saving for lever in chosen)
    names = " + ".join(LEVER_NAMES.get(lever.key, lever.key) for lever in chosen)
    enough = "enough" if total >= advice.needed else "not enough"
    return f"{names}: frees {format_bytes(total)} of the {format_bytes(advice.needed)} needed ({enough})"


def top_lever(advice: Advice | None) -> Lever | None:
    """The lever to name first: the first recommended one, else the cheapest in quality that saves memory."""
    if advice is None:
        return None
    for lever in advice.levers:
        if lever.key in advice.recommended:
            return lever
    return next((lever for lever in advice.levers if lever.saving > 0), None)


def ordered(results: Iterable[TestResult]) -> list[TestResult]:
    """``results`` sorted with :data:`ORDER`: failures first."""
    return sorted(results, key=ORDER)


def counts_line(results: Iterable[TestResult]) -> str:
    """``2 regressions, 1 over budget, 1 improved, 3 new, 10 ok``; statuses that did not occur are left out."""
    counts = Counter(r.verdict.status for r in results)
    parts = []
    for status in _COUNT_ORDER:
        n = counts.get(status, 0)
        if n:
            parts.append(f"{n} {(_SINGULAR if n == 1 else _PLURAL).get(status, status)}")
    return ", ".join(parts)


def notes(results: list[TestResult], warn_only: bool = False, updating: bool = False) -> list[str]:
    """The lines shown under the table: software changes, other hardware, the update hint, warn-only.

    ``updating``: the run is recording baselines, so the hint to record them is left out.
    """
    lines = []
    groups = Counter(tuple(r.verdict.software_changes) for r in results if r.verdict.software_changes)
    for changes, n in sorted(groups.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"software changed since baselines: {'; '.join(changes)} ({plural(n, 'test')})")

    elsewhere = [r for r in results if r.verdict.status == "new" and r.verdict.other_hardware]
    if elsewhere:
        hardware = ", ".join(sorted({r.hardware for r in elsewhere}))
        others = ", ".join(sorted({h for r in elsewhere for h in r.verdict.other_hardware}))
        lines.append(
            f"{plural(len(elsewhere), 'new test')} without baselines for hardware {hardware}; "
            f"baselines exist for: {others}"
        )

    if not updating and any(r.verdict.status in ("improved", "new") for r in results):
        lines.append(f"improved or new results: review them and record baselines with {UPDATE_OPTION}")

    failed = sum(r.verdict.status in FAILING for r in results)
    if warn_only and failed:
        lines.append(f"warn-only: {plural(failed, 'memory failure')} reported but not enforced")
    return lines
