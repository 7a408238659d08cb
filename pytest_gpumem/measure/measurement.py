"""One test's measurement: a meter's segments assigned to phases.

Phases nest: ``setup`` and ``call`` are opened by the plugin, and a test (or a
fixture) opens named ones inside them with ``gpumem.phase("forward")``. At
every phase boundary the meter closes a segment; each segment's peak counts
for every phase open during it, so a phase's peak is the largest of its
segments and ``call`` includes its named phases. A name used twice (a loop)
keeps the larger peak.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pytest_gpumem.core.sample import Attribution, Fit, Peaks, Sample, largest, merge_max
from pytest_gpumem.measure import ranks
from pytest_gpumem.measure.attribution import Attributor
from pytest_gpumem.measure.discovery import Discovery
from pytest_gpumem.measure.introspect import Probe
from pytest_gpumem.measure.meters import base
from pytest_gpumem.measure.meters.base import Meter
from pytest_gpumem.measure.snapshot import cuda_snapshot, from_records, start_cuda_history, stop_cuda_history

KNOBS = ("batch", "seq", "accumulation", "steps", "gradient_checkpointing", "autocast", "optimizer")
"""The knob names the advisor knows how to turn: per-device batch size, sequence length,
gradient accumulation steps, optimizer steps, gradient checkpointing (bool), autocast dtype
("bfloat16" or None) and optimizer ("adamw", "adamw8bit", "paged_adamw8bit")."""


@dataclass
class Registration:
    """What a test made visible of its training setup, for the advisor.

    Models and optimizers are held by weak references: registering must not
    keep alive what the test frees (``del model`` in a test that compares two
    loads), or it would change what is measured. What the test still holds
    when it ends (a model from a function-scoped fixture, say) can be
    inspected and re-run. ``step`` runs the test's training step again with
    knobs given as keyword arguments (a subset of :data:`KNOBS`); ``knobs``
    are the values the test ran with. The fixtures register themselves; a
    test with its own training code registers through ``gpumem.register(...)``.
    """

    _models: list[weakref.ref[Any]] = field(default_factory=list)
    _optimizers: list[weakref.ref[Any]] = field(default_factory=list)
    step: Callable[..., Any] | None = None
    knobs: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> list[Any]:
        """The registered models still alive, the latest registered first (``lora`` wraps what
        ``quantized_model`` made)."""
        return [m for m in (ref() for ref in self._models) if m is not None]

    @property
    def optimizers(self) -> list[Any]:
        return [o for o in (ref() for ref in self._optimizers) if o is not None]

    @property
    def models_freed(self) -> bool:
        """Models were registered, and the test freed them all (so its step cannot run again)."""
        return bool(self._models) and not self.models

    def add_model(self, model: Any) -> None:
        self._models = [weakref.ref(model)] + [ref for ref in self._models if ref() is not model]

    def add_optimizer(self, optimizer: Any) -> None:
        if all(ref() is not optimizer for ref in self._optimizers):
            self._optimizers.append(weakref.ref(optimizer))

    def copy(self) -> Registration:
        return Registration(list(self._models), list(self._optimizers), self.step, dict(self.knobs))


_active: Measurement | None = None


def active() -> Measurement | None:
    """The measurement of the test running now (for hooks that have no fixture: a Trainer callback)."""
    return _active


class Measurement:
    """Measures one test from ``begin`` (in the constructor) to :meth:`finish`."""

    def __init__(self, meter: Meter, snapshot: bool = False, limit: int | None = None, explain: bool = True) -> None:
        """``explain``: also keep the advisor's evidence (discovery's global hooks, a probe on each registered
        model); without it, and with a meter that keeps no tracker, the test pays for the allocator's
        statistics only (the fast path), and what it registers is only kept."""
        self._meter = meter
        self.explain = explain
        self.limit = limit  # the device limit in force while it measures (None: the device's own memory)
        if limit is not None:
            guard = base.guard(meter)
            if guard is None:
                raise ValueError(f"device_limit: the {meter.backend} backend cannot enforce a device limit")
            guard.set_limit(limit)  # ValueError for a limit the device cannot simulate
        self.before = meter.begin()
        self.discovery = Discovery()  # the models and optimizers the test runs, registered or not
        tracker = getattr(meter, "tracker", None)
        self._attributor = Attributor(tracker) if tracker is not None else None
        self._snapshot = snapshot
        self.snapshot: dict[str, Any] | None = None  # with ``snapshot=True``, the test's memory snapshot
        if snapshot and meter.backend == "cuda":
            start_cuda_history()
        self.phases: dict[str, Peaks] = {}
        self._open: list[str] = []
        self._overall: Peaks = {}
        self.finished = False
        self.registration = Registration()
        self.registered_in_setup = Registration()  # what was registered before the call phase (by fixtures)
        self.attribution: Attribution | None = None
        self.probe: Any = None  # an introspect.Probe on the latest registered model
        self.fits: list[Fit] = []  # searches the test ran with gpumem.max_fit
        self._spans: list[Peaks] = []  # the peaks of each open span()
        # Last, so that nothing above can fail with the environment changed: child processes see it.
        self._ranks = ranks.RankDirectory(meter.backend)
        if explain:
            self.discovery.start()
        global _active
        _active = self

    def _close_segment(self) -> None:
        segment = self._meter.mark()
        try:
            # Child processes that exited during the segment (ranks): absolute bytes, since each starts empty.
            merge_max(segment, self._ranks.collect())
        finally:  # a corrupt rank file raises, but the segment's own peaks still count
            merge_max(self._overall, segment)
            for name in self._open:
                merge_max(self.phases[name], segment)
            for peaks in self._spans:
                merge_max(peaks, segment)

    @contextmanager
    def span(self) -> Iterator[Peaks]:
        """Measure the enclosed block on its own, phases opened inside it included (it still counts for every
        open phase): the yielded dict holds its peaks, above what was resident before the test, once the
        block has ended."""
        self._close_segment()
        peaks: Peaks = {}
        self._spans.append(peaks)
        try:
            yield peaks
        finally:
            self._close_segment()
            self._spans.remove(peaks)

    @property
    def backend(self) -> str:
        return self._meter.backend

    @property
    def attributor(self) -> Attributor | None:
        """What attributes the test's memory to its consumers (None where the meter keeps no tracker)."""
        return self._attributor

    def enter(self, name: str) -> None:
        self._close_segment()
        self.phases.setdefault(name, {})
        self._open.append(name)
        if name == "call":
            self.registered_in_setup = self.registration.copy()
        if self._attributor is not None:
            self._attributor.tracker.phase = name
            if name == "call":
                self._attributor.tracker.restart_window()

    def exit(self, name: str) -> None:
        self._close_segment()
        # The innermost phase of that name: phases close in reverse order of opening.
        del self._open[len(self._open) - 1 - self._open[::-1].index(name)]
        if self._attributor is not None:
            self._attributor.tracker.phase = self._open[-1] if self._open else ""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Label the enclosed block as stage ``name`` (``load``) in the attribution."""
        if self._attributor is None:
            yield
            return
        with self._attributor.stage(name):
            yield

    def release(self) -> None:
        """Drop what the measurement holds of the test (its registered step and knobs), so that what is
        still alive after the test's teardown is the test's doing, not the plugin's."""
        self.registration = Registration()
        self.probe = None
        self.discovery = Discovery()

    def register_model(self, model: Any) -> None:
        """Register a model for the advisor (watched by a probe while the test runs), and its weights
        for the attribution now (before a forward)."""
        if self.finished:
            return
        self.registration.add_model(model)
        if self._attributor is not None:
            self._attributor.register_model(model)
        if not self.explain:
            return
        if self.probe is not None:
            self.probe.detach()
        self.probe = Probe(model)

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

    def _take_snapshot(self) -> dict[str, Any] | None:
        if self._meter.backend == "cuda":
            snapshot = cuda_snapshot()
            stop_cuda_history()
            return snapshot
        return from_records(self._attributor.tracker.records) if self._attributor is not None else None

    def finish(self) -> Sample:
        """Stop measuring and return the sample (phases still open are closed)."""
        if not self.finished:
            try:
                self._close_segment()
            finally:
                self._ranks.close()  # before anything else can fail: the environment is put back
            self._open.clear()
            if self._attributor is not None:
                self.attribution = self._attributor.result(self.phases.get("call", {}))
                self._attributor.close()
            if self._snapshot:
                self.snapshot = self._take_snapshot()
            if self.probe is not None:
                self.probe.detach()
            self.discovery.stop()
            self._meter.end()
            if self.limit is not None:
                guard = base.guard(self._meter)
                assert guard is not None
                guard.set_limit(None)
            self.finished = True
            global _active
            if _active is self:
                _active = None
        return Sample(backend=self._meter.backend, before=self.before, phases=self.phases, attribution=self.attribution)
