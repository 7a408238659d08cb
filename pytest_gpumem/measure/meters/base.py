"""Meters: one protocol, one module per backend (the cpu tracker and cuda here, the estimate in
:mod:`pytest_gpumem.estimate.meter`).

A meter measures one test at a time. ``begin`` cleans up, resets the peak
statistics and returns what is resident (absolute bytes); each ``mark`` returns
the peaks *above that* since the previous mark and starts a new segment, so the
caller can assign segments to phases; ``end`` stops measuring.

Some capabilities are optional (:class:`Guard`): ``set_limit`` caps every
device (a smaller GPU simulated), ``leftover`` says what the last test left
allocated after its teardown, and ``in_use`` what is allocated now, as a
limit counts it. The cpu and cuda meters have them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pytest_gpumem.core.sample import Peaks


class Meter(Protocol):
    backend: str
    metrics: tuple[str, ...]

    def begin(self) -> Peaks: ...

    def mark(self) -> Peaks: ...

    def end(self) -> None: ...


@runtime_checkable
class Guard(Protocol):
    """What a meter needs to enforce a device limit and to find leaks."""

    def set_limit(self, limit: int | None) -> None: ...

    def leftover(self) -> dict[str, int]: ...

    def in_use(self) -> dict[str, int]: ...


def guard(meter: object) -> Guard | None:
    """``meter`` as a :class:`Guard`, or None where it cannot limit a device or tell leftovers."""
    return meter if isinstance(meter, Guard) else None
