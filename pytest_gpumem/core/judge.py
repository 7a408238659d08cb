"""Sample + spec + baseline -> Verdict. Pure: no pytest, no I/O."""

from __future__ import annotations

from pytest_gpumem.core.environment import software_changes
from pytest_gpumem.core.sample import Baseline, DeviceVerdict, OutOfMemory, Sample, Spec, Verdict, device_order


def judge(
    sample: Sample,
    spec: Spec,
    baseline: Baseline | None,
    software: dict[str, str],
    other_hardware: list[str] | None = None,
    oom: OutOfMemory | None = None,
) -> Verdict:
    """Decide one test's verdict on ``spec.metric``, device by device.

    A test that ran out of memory (``oom``) is ``oom``, whatever its peak.
    The value judged is the call phase's peak above what was resident before
    the test (so setup's leftovers count), on each device. Budget first: a
    device over its ceiling (``budget`` holds for every device,
    ``budget_per_device`` for the devices it names) fails the test whatever
    its baseline says. Each device is compared with the same device's
    baseline: a device the baseline lacks grows from 0, one it has that the
    test no longer used counts 0 now. Only growth beyond the tolerance fails;
    shrinking beyond it is ``improved``. A baseline taken with other library
    versions is compared all the same, and the verdict names what changed.

    The verdict carries the deciding device's numbers: the one furthest over
    its budget, else the one grown furthest beyond its allowance, else (when
    improved) the one shrunk furthest, else the largest; every device's
    numbers are in ``devices`` when there is more than one.
    """
    now = sample.phases.get("call", {}).get(spec.metric) or {}
    before = (baseline.metrics.get(spec.metric) or {}) if baseline else {}
    has_baseline = bool(before)  # a baseline that lacks this metric is none for it
    rows = [
        _device(device, now.get(device, 0), before.get(device), has_baseline, spec)
        for device in sorted(now.keys() | before.keys(), key=device_order)
    ]
    statuses = {row.status for row in rows}
    if oom is not None:
        status = "oom"
    elif "over_budget" in statuses:
        status = "over_budget"
    elif not has_baseline:
        status = "new"
    else:
        status = next((s for s in ("regression", "improved") if s in statuses), "ok")
    decider = _decider(rows, status, oom)
    return Verdict(
        status=status,
        metric=spec.metric,
        value=decider.value if decider else 0,
        budget=decider.budget if decider else spec.budget,
        baseline=decider.baseline if decider else None,
        allowed=decider.allowed if decider else None,
        tolerance=str(spec.tolerance),
        software_changes=software_changes(baseline.software, software) if baseline else [],
        other_hardware=sorted(other_hardware or []) if not has_baseline else [],
        oom=oom,
        device=decider.device if decider else None,
        devices=rows if len(rows) > 1 else [],
    )


def _device(device: str, value: int, base: int | None, has_baseline: bool, spec: Spec) -> DeviceVerdict:
    """One device's numbers and own status; ``base`` None where the baseline lacks the device."""
    row = DeviceVerdict(device=device, value=value, budget=spec.device_budget(device))
    if has_baseline:
        row.baseline = 0 if base is None else base  # a device the baseline lacks grows from nothing
        row.in_baseline = base is not None
        row.allowed = spec.tolerance.allowed(row.baseline)
    if row.budget is not None and value > row.budget:
        row.status = "over_budget"
    elif row.baseline is None or row.allowed is None:
        row.status = "new"
    elif value - row.baseline > row.allowed:
        row.status = "regression"
    elif row.baseline - value > row.allowed:
        row.status = "improved"
    return row


def _decider(rows: list[DeviceVerdict], status: str, oom: OutOfMemory | None) -> DeviceVerdict | None:
    """The device whose numbers the verdict carries; first in device order on ties."""
    if not rows:
        return None
    if status == "over_budget":
        return max((r for r in rows if r.status == status), key=lambda r: r.value - (r.budget or 0))
    if status in ("regression", "improved"):
        return max((r for r in rows if r.status == status), key=lambda r: abs(r.delta or 0) - (r.allowed or 0))
    if oom is not None and any(r.device == oom.device for r in rows):
        return next(r for r in rows if r.device == oom.device)
    return max(rows, key=lambda r: r.value)


def needed(verdict: Verdict) -> int | None:
    """Bytes the test must give back to meet its budget (over budget), its baseline plus tolerance
    (regression), or to fit under the memory it ran out of (oom: the failed request's shortfall, or the whole
    run's overshoot where it was measured, whichever is larger); None when it fails neither.

    On several devices, the deciding device's: the one furthest over, which needs the most given back."""
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
