"""Sample + spec + baseline -> Verdict. Pure: no pytest, no I/O."""

from __future__ import annotations

from .environment import software_changes
from .sample import Baseline, Sample, Spec, Verdict, largest


def judge(
    sample: Sample,
    spec: Spec,
    baseline: Baseline | None,
    software: dict[str, str],
    other_hardware: list[str] | None = None,
) -> Verdict:
    """Decide one test's verdict on ``spec.metric``.

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
    if spec.budget is not None and value > spec.budget:
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
    )


def needed(verdict: Verdict) -> int | None:
    """Bytes the test must give back to meet its budget (over budget) or its baseline plus tolerance
    (regression); None when it fails neither."""
    if verdict.value is None:
        return None
    if verdict.status == "over_budget" and verdict.budget is not None:
        return verdict.value - verdict.budget
    if verdict.status == "regression" and verdict.baseline is not None and verdict.allowed is not None:
        return verdict.value - (verdict.baseline + verdict.allowed)
    return None
