"""One test's measurement: a meter's segments assigned to phases.

Phases nest: ``setup`` and ``call`` are opened by the plugin, and a test (or a
fixture) opens named ones inside them with ``gpumem.phase("forward")``. At
every phase boundary the meter closes a segment; each segment's peak counts
for every phase open during it, so a phase's peak is the largest of its
segments and ``call`` includes its named phases. A name used twice (a loop)
keeps the larger peak.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .meters import Meter
from .sample import Peaks, Sample, largest, merge_max


class Measurement:
    """Measures one test from ``begin`` (in the constructor) to :meth:`finish`."""

    def __init__(self, meter: Meter) -> None:
        self._meter = meter
        self.before = meter.begin()
        self.phases: dict[str, Peaks] = {}
        self._open: list[str] = []
        self._overall: Peaks = {}
        self.finished = False

    def _close_segment(self) -> None:
        segment = self._meter.mark()
        merge_max(self._overall, segment)
        for name in self._open:
            merge_max(self.phases[name], segment)

    def enter(self, name: str) -> None:
        self._close_segment()
        self.phases.setdefault(name, {})
        self._open.append(name)

    def exit(self, name: str) -> None:
        self._close_segment()
        # The innermost phase of that name: phases close in reverse order of opening.
        del self._open[len(self._open) - 1 - self._open[::-1].index(name)]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak of the enclosed block as phase ``name``."""
        self.enter(name)
        try:
            yield
        finally:
            self.exit(name)

    def peak(self, metric: str = "allocated", phase: str | None = None) -> int:
        """The peak of ``metric`` so far, of the test or of one ``phase``, in bytes above what was resident
        before the test."""
        self._close_segment()
        if phase is not None and phase not in self.phases:
            raise KeyError(f"gpumem.peak: no phase {phase!r} was recorded (recorded: {', '.join(self.phases)})")
        return largest(self.phases[phase] if phase else self._overall, metric) or 0

    def finish(self) -> Sample:
        """Stop measuring and return the sample (phases still open are closed)."""
        if not self.finished:
            self._close_segment()
            self._open.clear()
            self._meter.end()
            self.finished = True
        return Sample(backend=self._meter.backend, before=self.before, phases=self.phases)
