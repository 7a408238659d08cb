"""The small vocabulary every stage speaks: plain dataclasses, bytes as ints.

A meter produces a :class:`Sample`; the judge turns it, the test's
:class:`Spec` and its stored :class:`Baseline` into a :class:`Verdict`; a
:class:`TestResult` carries all of it to the reporters and the store. Each
class converts to and from plain dicts, because results travel between
pytest-xdist workers and the controller and are written as JSON.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from pytest_gpumem.core.units import Tolerance

METRICS = ("allocated", "reserved", "device")
"""``allocated``: bytes of live tensors (PyTorch allocator); ``reserved``: bytes the
caching allocator holds from the device; ``device``: the device's own used memory (NVML)."""

CONSUMERS = ("weights", "gradients", "optimizer", "activations")
"""What the allocated peak is split into: parameters and buffers (quantized storage and its
statistics included), gradients, optimizer state, and activations (saved for backward, and
temporaries alive at the peak)."""

STAGES = ("load", "forward", "backward", "optimizer")

STATUSES = ("ok", "new", "improved", "regression", "over_budget", "oom")
FAILING = frozenset({"regression", "over_budget", "oom"})

Peaks = dict[str, dict[str, int]]
"""Bytes per metric, then per device: ``{"allocated": {"cuda:0": 123}}``."""


def largest(peaks: Peaks, metric: str) -> int | None:
    """The largest value of ``metric`` over all devices, or None if it was not measured."""
    per_device = peaks.get(metric)
    return max(per_device.values()) if per_device else None


def device_order(device: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for device names that orders their numbers as numbers: ``cuda:2`` before ``cuda:10``,
    ``rank2:cuda:0`` before ``rank10:cuda:0``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", device) if part)


def touched(peaks: Peaks, first: str) -> Peaks:
    """Only the devices the peaks' allocator figures show in use, so a test that used one GPU of several
    reads as it would on a machine with that one GPU (NVML's figure alone does not count: on a whole device
    it includes other processes); ``first`` alone where none was used."""
    used = {device for metric in ("allocated", "reserved") for device, n in peaks.get(metric, {}).items() if n > 0}
    keep = used or {first}
    return {metric: {d: n for d, n in per_device.items() if d in keep} for metric, per_device in peaks.items()}


def merge_max(into: Peaks, other: Peaks) -> None:
    """Raise every value of ``into`` to at least the matching value of ``other``."""
    for metric, per_device in other.items():
        target = into.setdefault(metric, {})
        for device, value in per_device.items():
            if value > target.get(device, -1):
                target[device] = value


@dataclass
class Breakdown:
    """Bytes per consumer at one moment; ``layer_activations`` is the part of ``activations``
    made inside the model's repeated blocks (decoder layers), the part that gradient
    checkpointing and shorter sequences act on."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    layer_activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Breakdown:
        return cls(**{k: int(v) for k, v in data.items() if k in _BREAKDOWN_FIELDS})


_BREAKDOWN_FIELDS = frozenset(("weights", "gradients", "optimizer", "activations", "layer_activations"))


@dataclass
class Attribution:
    """Where the call phase's allocated peak went, and when it happened.

    ``peak`` splits the allocated peak on ``device`` by consumer; ``stages`` holds
    the breakdown at the highest moment of each stage (forward, backward,
    optimizer, load), so that a lever that lowers one stage can be weighed against
    the others. ``fragmentation`` is what the caching allocator reserved beyond
    the allocated peak (reserved peak - allocated peak) and ``context`` what the
    device used beyond that (NVML - reserved: the CUDA context, library
    workspaces, other processes); both are 0 where not measured. ``phase`` is the
    innermost measurement phase at the peak, ``stage`` one of :data:`STAGES` (or
    empty), ``module`` the qualified name of the module running (or an autograd
    node's name in backward), where known.
    """

    peak: Breakdown
    device: str = ""
    phase: str = ""
    stage: str = ""
    module: str = ""
    stages: dict[str, Breakdown] = field(default_factory=dict)
    fragmentation: int = 0
    context: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak": self.peak.to_dict(),
            "device": self.device,
            "phase": self.phase,
            "stage": self.stage,
            "module": self.module,
            "stages": {name: b.to_dict() for name, b in self.stages.items()},
            "fragmentation": self.fragmentation,
            "context": self.context,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attribution:
        return cls(
            peak=Breakdown.from_dict(data["peak"]),
            device=data.get("device", ""),
            phase=data.get("phase", ""),
            stage=data.get("stage", ""),
            module=data.get("module", ""),
            stages={name: Breakdown.from_dict(b) for name, b in data.get("stages", {}).items()},
            fragmentation=int(data.get("fragmentation", 0)),
            context=int(data.get("context", 0)),
        )


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
    attribution: Attribution | None = None

    def value(self, metric: str, phase: str = "call") -> int | None:
        """The test's peak of ``metric`` in ``phase``, over all devices."""
        return largest(self.phases.get(phase, {}), metric)

    def absolute_peak(self, metric: str, phase: str = "call") -> int:
        """The peak of ``metric`` in ``phase`` on the fullest device, with what was resident before the test:
        what the device had to hold."""
        before = self.before.get(metric, {})
        peaks = self.phases.get(phase, {}).get(metric, {})
        return max((before.get(device, 0) + peak for device, peak in peaks.items()), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "before": self.before,
            "phases": self.phases,
            "attribution": self.attribution.to_dict() if self.attribution else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        attribution = data.get("attribution")
        return cls(
            backend=data["backend"],
            before=data.get("before", {}),
            phases=data.get("phases", {}),
            attribution=Attribution.from_dict(attribution) if attribution else None,
        )


@dataclass(frozen=True)
class Spec:
    """A test's memory contract, from its ``gpumem`` marker and the run's settings.

    ``device_limit`` caps what the test may use on each device (a smaller GPU
    simulated); ``leak`` is what the test may leave alive after its teardown:
    None flags leftovers above :data:`LEAK_FLAG` without failing, False checks
    nothing, a Tolerance fails the test above it. ``retry_on_oom`` names the
    knob of the registered step that is searched down after an out-of-memory error.

    ``budget`` caps every device (so the largest), ``budget_per_device`` the
    devices it names: ``(device, bytes)`` pairs in device order, a tuple so that
    the Spec stays immutable, hashable and picklable. ``exclusive`` asks the
    scheduler to run the test alone on its device; the judge does not read it.
    """

    metric: str = "allocated"
    budget: int | None = None
    tolerance: Tolerance = Tolerance(percent=2.0)  # noqa: RUF009 - frozen, so sharing it is safe
    device_limit: int | None = None
    leak: Tolerance | bool | None = None
    retry_on_oom: str | None = None
    budget_per_device: tuple[tuple[str, int], ...] = ()
    exclusive: bool = False

    def device_budget(self, device: str) -> int | None:
        """The ceiling on ``device``: the lower of ``budget`` and the device's own; None where neither is set."""
        limits = [n for d, n in self.budget_per_device if d == device]
        if self.budget is not None:
            limits.append(self.budget)
        return min(limits) if limits else None


LEAK_FLAG = Tolerance(floor=2**20)
"""Leftovers above this are flagged (a warning, not a failure) when neither marker nor option sets a leak limit."""


@dataclass
class OutOfMemory:
    """A test that ran out of memory: what it asked for, and the device at that moment.

    ``requested`` is the allocation that failed (on CUDA what the caching
    allocator tried to take from the device: the request rounded to its blocks);
    ``allocated`` and ``reserved`` are bytes per device, as the device counts
    them (on the cpu backend: the live storages the meter counts, of this test
    and what earlier tests left alive). ``limit`` is the device limit in force
    (None: the device's own memory), ``free`` what the device or the limit still
    allowed, so the request was ``requested - free`` bytes short (:attr:`needed`).
    ``overshoot`` is what the whole run needs beyond the limit, where the step
    could be run again without it and measured: it may need more after the
    allocation that failed. ``attribution`` is what was alive at the failure, by
    consumer, and where the test was then; ``message`` the error's first line.
    """

    device: str
    requested: int | None
    allocated: dict[str, int] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)
    limit: int | None = None
    free: int | None = None
    message: str = ""
    attribution: Attribution | None = None
    overshoot: int | None = None

    @property
    def needed(self) -> int | None:
        """Bytes the failed request was short of; None where that is not known."""
        if self.requested is None or self.free is None:
            return None
        return max(0, self.requested - self.free)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attribution"] = self.attribution.to_dict() if self.attribution else None
        data["needed"] = self.needed
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutOfMemory:
        attribution = data.get("attribution")
        return cls(
            device=data.get("device", ""),
            requested=data.get("requested"),
            allocated=dict(data.get("allocated") or {}),
            reserved=dict(data.get("reserved") or {}),
            limit=data.get("limit"),
            free=data.get("free"),
            message=data.get("message", ""),
            attribution=Attribution.from_dict(attribution) if attribution else None,
            overshoot=data.get("overshoot"),
        )


@dataclass
class Leak:
    """What a test left alive after its teardown: ``bytes`` (the most on any device, above what was
    resident before it) per device in ``devices``; ``allowed`` is the limit (or the flagging threshold),
    and ``enforced`` says whether going over it fails the test (the user set a limit) or only flags it."""

    bytes: int
    devices: dict[str, int] = field(default_factory=dict)
    allowed: int = 0
    enforced: bool = False

    @property
    def flagged(self) -> bool:
        return self.bytes > self.allowed

    @property
    def failed(self) -> bool:
        return self.enforced and self.flagged

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Leak:
        return cls(
            bytes=int(data["bytes"]),
            devices=dict(data.get("devices") or {}),
            allowed=int(data.get("allowed", 0)),
            enforced=bool(data.get("enforced", False)),
        )


@dataclass
class Fit:
    """A search for the largest value of a knob (batch, seq) that fits in memory.

    ``tried`` lists every value run, in order, with its peak (None: it ran out
    of memory); ``value`` is the largest that fits (None: not even ``floor``
    fits) and ``peak`` the test's peak at it. ``purpose``: the search was what
    the test asked for (``gpumem.max_fit``), not a retry after the test ran out
    of memory with ``start``. ``note`` says why a search could not run.
    """

    knob: str
    start: int
    floor: int = 1
    value: int | None = None
    peak: int | None = None
    limit: int | None = None
    tried: list[tuple[int, int | None]] = field(default_factory=list)
    purpose: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tried"] = [list(pair) for pair in self.tried]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fit:
        return cls(**{**data, "tried": [(int(v), p) for v, p in data.get("tried", [])]})


@dataclass
class Baseline:
    """One stored, reviewed measurement of a test on one hardware key."""

    metrics: Peaks
    phases: dict[str, Peaks]
    software: dict[str, str]
    recorded: str
    backend: str
    attribution: Attribution | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attribution"] = self.attribution.to_dict() if self.attribution else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        attribution = data.get("attribution")
        return cls(
            metrics=data["metrics"],
            phases=data.get("phases", {}),
            software=data.get("software", {}),
            recorded=data.get("recorded", ""),
            backend=data.get("backend", ""),
            attribution=Attribution.from_dict(attribution) if attribution else None,
        )


@dataclass
class DeviceVerdict:
    """One device's numbers in a multi-device verdict.

    ``baseline`` is None only where the test has no baseline at all; a device
    the baseline lacks is compared against 0 (``in_baseline`` False), a device
    the baseline has but the test no longer used counts ``value`` 0. ``budget``
    is the ceiling on this device (see :meth:`Spec.device_budget`). ``status``
    is the device's own: ok, new, improved, regression or over_budget.
    """

    device: str
    value: int
    baseline: int | None = None
    allowed: int | None = None
    budget: int | None = None
    status: str = "ok"
    in_baseline: bool = True

    @property
    def delta(self) -> int | None:
        return None if self.baseline is None else self.value - self.baseline

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceVerdict:
        return cls(**data)


@dataclass
class Verdict:
    """The judge's decision, with every number that decided it.

    ``device`` is the device that decided (the one furthest over its budget,
    regressed or improved, the one that ran out of memory, else the largest;
    None where nothing was measured) and ``value``, ``baseline``, ``allowed`` and ``budget``
    are its numbers; ``devices`` holds every device's, only where the test
    measured more than one (so a single-device verdict reads as it always has).
    """

    status: str
    metric: str
    value: int | None
    budget: int | None = None
    baseline: int | None = None
    allowed: int | None = None
    tolerance: str = ""
    software_changes: list[str] = field(default_factory=list)
    other_hardware: list[str] = field(default_factory=list)
    oom: OutOfMemory | None = None  # with status oom: the failed request and the device at that moment
    device: str | None = None
    devices: list[DeviceVerdict] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status in FAILING

    @property
    def delta(self) -> int | None:
        if self.value is None or self.baseline is None:
            return None
        return self.value - self.baseline

    def row(self, device: str | None = None) -> DeviceVerdict | None:
        """The per-device row of ``device`` (default: the deciding one); None for single-device verdicts."""
        wanted = self.device if device is None else device
        return next((row for row in self.devices if row.device == wanted), None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["oom"], data["devices"]
        if self.oom is not None:  # only where there is one, so other verdicts read as before
            data["oom"] = self.oom.to_dict()
        if self.devices:  # likewise only for multi-device tests
            data["devices"] = [row.to_dict() for row in self.devices]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        oom = data.get("oom")
        return cls(
            **{
                **data,
                "oom": OutOfMemory.from_dict(oom) if oom else None,
                "devices": [DeviceVerdict.from_dict(row) for row in data.get("devices") or []],
            }
        )


LEVERS = (
    "fix",
    "batch",
    "spread",
    "checkpointing",
    "seq",
    "bf16",
    "lora",
    "weights8",
    "weights4",
    "qlora",
    "rank",
    "targets",
    "optimizer",
)
"""The levers, in the order of their cost to quality: fixing an ineffective or counterproductive
setting (free), smaller batch with gradient accumulation, the model spread over the GPUs present
(inference: ``device_map="auto"``), gradient checkpointing, shorter max_seq_length, bf16 mixed
precision, LoRA instead of full fine-tuning, 8-bit or 4-bit weights (inference), 4-bit QLoRA, lower
LoRA rank, fewer LoRA target modules, 8-bit or paged optimizer."""


@dataclass
class Lever:
    """One way to give memory back, with what it saves on this test's peak.

    ``saving`` is the bytes the test's peak would drop by (negative: it would
    grow); it is ``measured`` where the advisor re-ran the test's registered
    step with the lever applied, ``replayed`` where it ran the test's own model
    on fake tensors with the lever applied (no step registered), else
    ``estimated`` from the attribution, and ``basis`` says how.
    ``estimated`` is kept beside a measured saving so the two can be compared.
    """

    key: str
    action: str
    saving: int
    source: str  # "measured" | "replayed" | "estimated"
    basis: str = ""
    estimated: int | None = None

    @property
    def rank(self) -> int:
        return LEVERS.index(self.key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lever:
        return cls(**data)


@dataclass
class Advice:
    """The advisor's answer: settings that do nothing or cost memory (said first), the applicable
    levers in order of cost to quality, and the cheapest combination that frees ``needed`` bytes
    (what the test must give back to meet its budget or baseline; None when nothing is needed)."""

    findings: list[str] = field(default_factory=list)
    levers: list[Lever] = field(default_factory=list)
    needed: int | None = None
    recommended: list[str] = field(default_factory=list)
    replay: str = ""  # how faithful the replay on fake tensors is, where levers were replayed
    frees: int | None = None  # what the recommended levers free together (less than their sum where they overlap)

    def to_dict(self) -> dict[str, Any]:
        return {
            "findings": self.findings,
            "levers": [lever.to_dict() for lever in self.levers],
            "needed": self.needed,
            "recommended": self.recommended,
            "replay": self.replay,
            "frees": self.frees,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Advice:
        return cls(
            findings=list(data.get("findings", [])),
            levers=[Lever.from_dict(lever) for lever in data.get("levers", [])],
            needed=data.get("needed"),
            recommended=list(data.get("recommended", [])),
            replay=str(data.get("replay", "")),
            frees=data.get("frees"),
        )


@dataclass
class Rerun:
    """The second run that explained a test measured without the attribution (the fast path).

    The test's body ran once more, inside its call phase, with the attribution's
    tracker and the advisor's hooks on; the attribution and the advice come
    from that run. ``measured`` is the first run's call peak of allocated bytes
    on ``device``, ``peak`` the second run's, both above what was resident
    before the test's setup: the allocated peak of a deterministic test repeats
    to the byte, so a difference means the attribution describes another run
    than the one judged. ``error`` names what the second run raised, if
    anything (an out-of-memory error repeated is expected).
    """

    device: str
    measured: int
    peak: int
    error: str = ""

    @property
    def reproduced(self) -> bool:
        return self.peak == self.measured

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reproduced": self.reproduced}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rerun:
        return cls(str(data["device"]), int(data["measured"]), int(data["peak"]), str(data.get("error", "")))


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
    advice: Advice | None = None
    snapshot: str = ""  # the memory snapshot written for it (--gpumem-snapshot), if any
    leak: Leak | None = None  # what it left alive after its teardown (None: not checked)
    fits: list[Fit] = field(default_factory=list)  # searches for the largest knob value that fits
    retried: Verdict | None = None  # packed: the verdict of its first run, out of memory beside other tests
    rerun: Rerun | None = None  # the second run its attribution came from, on the fast path

    def to_dict(self) -> dict[str, Any]:
        data = {
            "nodeid": self.nodeid,
            "hardware": self.hardware,
            "passed": self.passed,
            "sample": self.sample.to_dict(),
            "verdict": self.verdict.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "advice": self.advice.to_dict() if self.advice else None,
            "snapshot": self.snapshot,
            "leak": self.leak.to_dict() if self.leak else None,
            "fits": [fit.to_dict() for fit in self.fits],
        }
        if self.retried is not None:  # only where there is one, so other results read as before
            data["retried"] = self.retried.to_dict()
        if self.rerun is not None:
            data["rerun"] = self.rerun.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestResult:
        return cls(
            nodeid=data["nodeid"],
            hardware=data["hardware"],
            passed=data["passed"],
            sample=Sample.from_dict(data["sample"]),
            verdict=Verdict.from_dict(data["verdict"]),
            baseline=Baseline.from_dict(data["baseline"]) if data.get("baseline") else None,
            advice=Advice.from_dict(data["advice"]) if data.get("advice") else None,
            snapshot=data.get("snapshot", ""),
            leak=Leak.from_dict(data["leak"]) if data.get("leak") else None,
            fits=[Fit.from_dict(fit) for fit in data.get("fits", [])],
            retried=Verdict.from_dict(data["retried"]) if data.get("retried") else None,
            rerun=Rerun.from_dict(data["rerun"]) if data.get("rerun") else None,
        )


@dataclass(frozen=True)
class Environment:
    """Where a run happened: the hardware key that baselines are filed under, and the software."""

    backend: str
    hardware: str
    software: dict[str, str] = field(default_factory=dict)
