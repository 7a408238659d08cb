"""Sample + spec + baseline -> Verdict. Pure: no pytest, no I/O."""

from __future__ import annotations

from .environment import software_changes
from .sample import Baseline, OutOfMemory, Sample, Spec, Verdict, largest


def judge(
    sample: Sample,
    spec: Spec,
    baseline: Baseline | None,
    software: dict[str, str],
    other_hardware: list[str] | None = None,
    oom: OutOfMemory | None = None,
) -> Verdict:
    """Decide one test's verdict on ``spec.metric``.

    A test that ran out of memory (``oom``) is ``oom``, whatever its peak.
    The value judged is the call phase's peak above what was resident before
    the test (so setup's leftovers count), the largest over devices. Budget
    first: a test over its ceiling fails whatever its baseline says. Against
    the baseline only growth beyond the tolerance fails; shrinking beyond it is
    ``improved``. A baseline taken with other library versions is compared all
    the same, and the verdict names what changed.
    """
    value = sample.value(spec.metric) or 0
    base = largest(baseline.metrics, spec.metric) if baseline else None
    allowed = spec.tolerance.allowed(base) if base is not None else None
    if oom is not None:
        status = "oom"
    elif spec.budget is not None and value > spec.budget:
        status = "over_budget"
    elif base is None or allowed is None:
        status = "new"
    elif value - base > allowed:
        status = "regression"
    elif base - value > allowed:
        status = "improved"
    else:
        status = "ok"
    return Verdict(
        status=status,
        metric=spec.metric,
        value=value,
        budget=spec.budget,
        baseline=base,
        allowed=allowed,
        tolerance=str(spec.tolerance),
        software_changes=software_changes(baseline.software, software) if baseline else [],
        other_hardware=sorted(other_hardware or []) if base is None else [],
        oom=oom,
    )


def needed(verdict: Verdict) -> int | None:
    """Bytes the test must give back to meet its budget (over budget), its baseline plus tolerance
    (regression), or to fit under the memory it ran out of (oom: the failed request's shortfall, or the whole
    run's overshoot where it was measured, whichever is larger); None when it fails neither."""
    if verdict.oom is not None:
        known = [n for n in (verdict.oom.needed, verdict.oom.overshoot) if n is not None]
        return max(known) if known else None
    if verdict.value is None:
        return None
    if verdict.status == "over_budget" and verdict.budget is not None:
        return verdict.value - verdict.budget
    if verdict.status == "regression" and verdict.baseline is not None and verdict.allowed is not None:
        return verdict.value - (verdict.baseline + verdict.allowed)
    return None
