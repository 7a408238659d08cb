"""What every reporter shows, as plain strings: row cells, ordering, counts and notes.

The terminal and Markdown reporters differ only in layout; the words and
numbers they show come from here, so the two cannot drift apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from ..sample import FAILING, TestResult, Verdict
from ..units import format_bytes, format_delta, format_percent

COLUMNS = ("test", "metric", "peak", "baseline", "delta", "budget", "verdict")
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
    ]


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
