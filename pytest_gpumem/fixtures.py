"""Fixtures: ``gpumem``, a handle on the current test's measurement."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from .measurement import Measurement

MEASUREMENT = pytest.StashKey[Measurement]()
"""The running measurement of an item, in ``item.stash`` from setup until its report."""


class GpuMem:
    """What a test sees of its own measurement."""

    def __init__(self, measurement: Measurement) -> None:
        self._measurement = measurement

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak of the enclosed block as the named phase (shown in every report)."""
        if not isinstance(name, str) or not name or name in ("setup", "call"):
            raise ValueError(f"gpumem.phase: {name!r} is not a phase name; use a non-empty name other than setup/call")
        with self._measurement.phase(name):
            yield

    def peak(self, metric: str = "allocated") -> int:
        """The test's peak of ``metric`` so far, in bytes above what was resident before it began."""
        return self._measurement.peak(metric)


@pytest.fixture
def gpumem(request: pytest.FixtureRequest) -> GpuMem:
    """Measure this test (even without the marker) and open named phases: ``with gpumem.phase("forward"):``."""
    return GpuMem(request.node.stash[MEASUREMENT])
