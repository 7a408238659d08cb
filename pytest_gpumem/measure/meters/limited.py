"""A meter with a device limit in force while it measures: the retry's re-runs under the test's limit."""

from __future__ import annotations

from pytest_gpumem.core.sample import Peaks
from pytest_gpumem.measure.meters.base import Meter, guard


class LimitedMeter:
    """A meter that puts a device limit in force from ``begin`` to ``end`` (for the retry's re-runs)."""

    def __init__(self, meter: Meter, limit: int | None) -> None:
        self._meter = meter
        self._limit = limit
        self.backend = meter.backend
        self.metrics = meter.metrics

    def _set(self, limit: int | None) -> None:
        meter_guard = guard(self._meter)
        if meter_guard is None:
            raise ValueError(f"the {self.backend} backend cannot enforce a device limit")
        meter_guard.set_limit(limit)

    def begin(self) -> Peaks:
        if self._limit is not None:
            self._set(self._limit)
        return self._meter.begin()

    def mark(self) -> Peaks:
        return self._meter.mark()

    def end(self) -> None:
        try:
            self._meter.end()
        finally:
            if self._limit is not None:
                self._set(None)
