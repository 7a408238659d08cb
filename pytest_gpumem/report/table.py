"""What every reporter shows, as plain strings: row cells, ordering, counts and notes.

The terminal and Markdown reporters differ only in layout; the words and
numbers they show come from here, so the two cannot drift apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from pytest_gpumem.core.sample import (
    CONSUMERS,
    FAILING,
    Advice,
    Attribution,
    Breakdown,
    DeviceVerdict,
    Fit,
    Leak,
    Lever,
    OutOfMemory,
    TestResult,
    Verdict,
)
from pytest_gpumem.core.units import format_bytes, format_delta, format_percent

COLUMNS = ("test", "metric", "peak", "baseline", "delta", "budget", "verdict", "largest consumer")
DEVICE_COLUMNS = ("device", "now", "baseline", "delta", "budget", "verdict")
"""The per-device breakdown of a test measured on several devices."""
NUMERIC = frozenset({"peak", "now", "baseline", "delta", "budget"})
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


_NAMED = frozenset({"oom", "over_budget", "regression", "improved"})
"""Statuses decided on one device, which a multi-device test's reports name."""


def decided_on(verdict: Verdict) -> str | None:
    """The device a multi-device verdict names (the one over budget, regressed, improved or out of memory);
    None for single-device verdicts, whose reports read as they always have, and for ok and new."""
    return verdict.device if verdict.devices and verdict.status in _NAMED else None


def verdict_cell(verdict: Verdict, warn_only: bool = False) -> str:
    """The verdict column: ``regression``, ``regression on cuda:1`` for a test on several devices, or
    ``regression (warn)`` for an unenforced failure."""
    word = status_word(verdict.status)
    device = decided_on(verdict)
    if device:
        word += f" on {device}"
    return f"{word} (warn)" if warn_only and verdict.failed else word


def _delta_text(delta: int | None, baseline: int | None) -> str:
    if delta is None:
        return "-"
    percent = format_percent(delta, baseline)
    return format_delta(delta) if percent == "-" else f"{format_delta(delta)} ({percent})"


def delta_cell(verdict: Verdict) -> str:
    """``+12.00 MiB (+0.8%)``; ``-`` without a baseline."""
    return _delta_text(verdict.delta, verdict.baseline)


def baseline_text(row: DeviceVerdict) -> str:
    """A device's baseline: its size, ``not in the baseline`` (compared with 0), or ``-`` without any."""
    return format_bytes(row.baseline) if row.in_baseline else "not in the baseline"


def device_rows(verdict: Verdict) -> list[list[str]]:
    """The per-device breakdown, in :data:`DEVICE_COLUMNS` order; empty for a single-device verdict."""
    return [
        [
            row.device,
            format_bytes(row.value),
            baseline_text(row),
            _delta_text(row.delta, row.baseline),
            format_bytes(row.budget),
            status_word(row.status),
        ]
        for row in verdict.devices
    ]


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
    "spread": "spread over the GPUs",
    "checkpointing": "gradient checkpointing",
    "seq": "shorter max_seq_length",
    "bf16": "bf16 mixed precision",
    "lora": "LoRA instead of full fine-tuning",
    "weights8": "8-bit weights",
    "weights4": "4-bit weights",
    "qlora": "4-bit QLoRA",
    "rank": "lower LoRA rank",
    "targets": "fewer LoRA target modules",
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


def current_attribution(result: TestResult) -> Attribution | None:
    """The attribution to explain a result with: at the failed allocation for a test that ran out of memory
    (where it had one), else at its peak."""
    oom = result.verdict.oom
    return oom.attribution if oom is not None and oom.attribution is not None else result.sample.attribution


def explained(result: TestResult) -> bool:
    """Whether the reports explain a test in full: it has advice, or it failed and its memory was attributed."""
    return result.advice is not None or (result.verdict.failed and current_attribution(result) is not None)


def attribution_rows(result: TestResult) -> list[list[str]]:
    """Rows of ``consumer, baseline, now, delta``: the four consumers, then the allocator's cache and the
    memory outside it where measured. The baseline column is ``-`` where the baseline has no attribution.
    For a test that ran out of memory, ``now`` is what was alive when the allocation failed."""
    now = current_attribution(result)
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
    total = advice.frees if advice.frees is not None else sum(lever.saving for lever in chosen)
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


# -- out of memory, retries and leaks


def oom_lines(oom: OutOfMemory) -> list[tuple[str, str]]:
    """The labelled lines that say how a test ran out of memory: the request, each device's bytes at that
    moment with the limit, what the request was short of, and what the whole step needs beyond the limit."""
    request = "unknown" if oom.requested is None else f"{format_bytes(oom.requested)} ({oom.requested} B)"
    lines = [("request", f"{request} on {oom.device or 'an unknown device'}")]
    for device in sorted(set(oom.allocated) | set(oom.reserved)):
        text = f"{device}: {format_bytes(oom.allocated.get(device))} allocated"
        if device in oom.reserved and oom.reserved[device] != oom.allocated.get(device):
            text += f", {format_bytes(oom.reserved[device])} reserved"
        if device == oom.device:
            if oom.limit is not None:
                text += f"; limit {format_bytes(oom.limit)}"
            if oom.free is not None:
                text += f"; {format_bytes(oom.free)} free"
        lines.append(("device", text))
    under = f"under the limit of {format_bytes(oom.limit)}" if oom.limit is not None else "on the device"
    if oom.needed is not None:
        lines.append(("short", f"the request needed {format_bytes(oom.needed)} more than was free {under}"))
    if oom.overshoot is not None:
        text = f"the whole step needs {format_bytes(oom.overshoot)} more than the limit (run again without it)"
        lines.append(("over", text))
    return lines


def _tried(fit: Fit) -> str:
    return ", ".join(f"{value} {'fits' if peak is not None else 'oom'}" for value, peak in fit.tried)


def fit_text(fit: Fit) -> str:
    """A search for the largest value that fits, in one line, saying what it changed."""
    under = f" under {format_bytes(fit.limit)}" if fit.limit is not None else ""
    if fit.note:
        return f"{fit.knob}: no search: {fit.note}"
    if fit.value is None:
        found = f"no {fit.knob} from {fit.start} down to {fit.floor} fits{under}"
    elif fit.purpose:
        found = f"the largest {fit.knob} that fits{under} is {fit.value} (peak {format_bytes(fit.peak)})"
    else:
        found = (
            f"{fit.knob} {fit.start} ran out of memory{under}; the largest {fit.knob} that fits is "
            f"{fit.value} (peak {format_bytes(fit.peak)}), found by re-running the step"
        )
    tried = f"; tried {_tried(fit)}" if fit.tried else ""
    changed = "" if fit.purpose else f"; the test ran with {fit.knob} {fit.start} and fails"
    return found + tried + changed


def leak_text(leak: Leak) -> str:
    """``left 2.00 MiB alive after its teardown (cpu 2.00 MiB); its limit is 1.00 MiB``."""
    devices = ", ".join(f"{device} {format_bytes(n)}" for device, n in leak.devices.items())
    where = f" ({devices})" if devices else ""
    allowed = format_bytes(leak.allowed)
    limit = f"its limit is {allowed}" if leak.enforced else f"flagged above {allowed}"
    return f"left {format_bytes(leak.bytes)} alive after its teardown{where}; {limit}"


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

    for result in ordered(results):
        if result.leak is not None and result.leak.flagged:
            lines.append(f"leak: {result.nodeid} {leak_text(result.leak)}")
        for fit in result.fits:
            lines.append(f"{'fit' if fit.purpose else 'retry'}: {result.nodeid}: {fit_text(fit)}")
        if result.retried is not None:
            lines.append(f"retried alone: {result.nodeid}: {retried_text(result)}")
        if result.rerun is not None and not result.rerun.reproduced:
            lines.append(f"rerun: {result.nodeid}: {rerun_text(result)}")

    failed = sum(r.verdict.status in FAILING for r in results)
    if warn_only and failed:
        lines.append(f"warn-only: {plural(failed, 'memory failure')} reported but not enforced")
    return lines


def rerun_text(result: TestResult) -> str:
    """Where a fast-path test's attribution came from: its second run, and whether that run repeated the
    measured peak; empty for a test attributed as it ran."""
    again = result.rerun
    if again is None:
        return ""
    text = "the attribution comes from a second run of the test, which "
    if again.reproduced:
        text += f"repeated its peak to the byte ({format_bytes(again.peak)})"
    else:
        text += (
            f"did not repeat its peak: {format_bytes(again.peak)} ({again.peak} B) against "
            f"{format_bytes(again.measured)} ({again.measured} B) measured, "
            f"{format_delta(again.peak - again.measured)}, so it describes that run"
        )
    return text + (f"; it raised {again.error}" if again.error else "")


def retried_text(result: TestResult) -> str:
    """What a packed test that ran out of memory beside other tests did when it ran again alone."""
    assert result.retried is not None
    first = result.retried.oom
    request = f" (a {format_bytes(first.requested)} request failed)" if first and first.requested else ""
    alone = "ran out of memory again" if result.verdict.status == "oom" else f"ran {result.verdict.status}"
    return f"ran out of memory beside other tests on a shared GPU{request}; alone it {alone}"
