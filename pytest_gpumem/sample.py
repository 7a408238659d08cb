"""The small vocabulary every stage speaks: plain dataclasses, bytes as ints.

A meter produces a :class:`Sample`; the judge turns it, the test's
:class:`Spec` and its stored :class:`Baseline` into a :class:`Verdict`; a
:class:`TestResult` carries all of it to the reporters and the store. Each
class converts to and from plain dicts, because results travel between
pytest-xdist workers and the controller and are written as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .units import Tolerance

METRICS = ("allocated", "reserved", "device")
"""``allocated``: bytes of live tensors (PyTorch allocator); ``reserved``: bytes the
caching allocator holds from the device; ``device``: the device's own used memory (NVML)."""

STATUSES = ("ok", "new", "improved", "regression", "over_budget", "oom")
FAILING = frozenset({"regression", "over_budget", "oom"})

Peaks = dict[str, dict[str, int]]
"""Bytes per metric, then per device: ``{"allocated": {"cuda:0": 123}}``."""


def largest(peaks: Peaks, metric: str) -> int | None:
    """The largest value of ``metric`` over all devices, or None if it was not measured."""
    per_device = peaks.get(metric)
    return max(per_device.values()) if per_device else None


def merge_max(into: Peaks, other: Peaks) -> None:
    """Raise every value of ``into`` to at least the matching value of ``other``."""
    for metric, per_device in other.items():
        target = into.setdefault(metric, {})
        for device, value in per_device.items():
            if value > target.get(device, -1):
                target[device] = value


@dataclass
class Sample:
    """What a meter measured for one test.

    ``before`` is what was resident when the test's setup began (absolute bytes;
    zero on the cpu backend, which sees only what the test allocates). Every
    value in ``phases`` is a peak *above* ``before``: the test's own share, so
    setup's leftovers count and earlier tests' do not. ``phases`` holds
    ``setup``, ``call`` and the named phases the test opened, in that order.
    """

    backend: str
    before: Peaks = field(default_factory=dict)
    phases: dict[str, Peaks] = field(default_factory=dict)

    def value(self, metric: str, phase: str = "call") -> int | None:
        """The test's peak of ``metric`` in ``phase``, over all devices."""
        return largest(self.phases.get(phase, {}), metric)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        return cls(backend=data["backend"], before=data.get("before", {}), phases=data.get("phases", {}))


@dataclass(frozen=True)
class Spec:
    """A test's memory contract, from its ``gpumem`` marker and the run's settings."""

    metric: str = "allocated"
    budget: int | None = None
    tolerance: Tolerance = Tolerance(percent=2.0)  # noqa: RUF009 - frozen, so sharing it is safe


@dataclass
class Baseline:
    """One stored, reviewed measurement of a test on one hardware key."""

    metrics: Peaks
    phases: dict[str, Peaks]
    software: dict[str, str]
    recorded: str
    backend: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        return cls(
            metrics=data["metrics"],
            phases=data.get("phases", {}),
            software=data.get("software", {}),
            recorded=data.get("recorded", ""),
            backend=data.get("backend", ""),
        )


@dataclass
class Verdict:
    """The judge's decision, with every number that decided it."""

    status: str
    metric: str
    value: int | None
    budget: int | None = None
    baseline: int | None = None
    allowed: int | None = None
    tolerance: str = ""
    software_changes: list[str] = field(default_factory=list)
    other_hardware: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status in FAILING

    @property
    def delta(self) -> int | None:
        if self.value is None or self.baseline is None:
            return None
        return self.value - self.baseline

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        return cls(**data)


@dataclass
class TestResult:
    """Everything known about one measured test, as reporters and the store need it.

    ``passed`` is the test's own outcome before any memory verdict: only tests
    that passed are recorded as baselines.
    """

    __test__ = False  # not a pytest test class, despite its name

    nodeid: str
    hardware: str
    sample: Sample
    verdict: Verdict
    passed: bool
    baseline: Baseline | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "hardware": self.hardware,
            "passed": self.passed,
            "sample": self.sample.to_dict(),
            "verdict": self.verdict.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestResult:
        return cls(
            nodeid=data["nodeid"],
            hardware=data["hardware"],
            passed=data["passed"],
            sample=Sample.from_dict(data["sample"]),
            verdict=Verdict.from_dict(data["verdict"]),
            baseline=Baseline.from_dict(data["baseline"]) if data.get("baseline") else None,
        )


@dataclass(frozen=True)
class Environment:
    """Where a run happened: the hardware key that baselines are filed under, and the software."""

    backend: str
    hardware: str
    software: dict[str, str] = field(default_factory=dict)
