"""What a test left behind: its leftovers after teardown, judged against a tolerance (by default only
flagged)."""

from __future__ import annotations

from pytest_gpumem.core.sample import Leak
from pytest_gpumem.core.units import Tolerance


def check_leak(devices: dict[str, int], policy: Tolerance | bool | None, peak: int, flag: Tolerance) -> Leak | None:
    """Judge ``devices`` (bytes per device a test left alive after its teardown) against ``policy``: a
    Tolerance is a limit (going over it fails; a percentage is of the test's ``peak``), None flags leftovers
    above ``flag`` without failing, False checks nothing."""
    if policy is False:
        return None
    tolerance = policy if isinstance(policy, Tolerance) else flag
    return Leak(
        bytes=max(devices.values(), default=0),
        devices={device: n for device, n in sorted(devices.items()) if n > 0},
        allowed=tolerance.allowed(peak),
        enforced=isinstance(policy, Tolerance),
    )
