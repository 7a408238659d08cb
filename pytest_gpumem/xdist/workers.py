"""pytest-xdist wiring: pin workers to GPUs, pack tests onto shared GPUs, retry alone.

Registered only when pytest-xdist is active and ``--gpumem-gpus-per-worker``
or ``--gpumem-pack`` is given. :class:`Controller` runs in the controller: it
sets each worker's ``CUDA_VISIBLE_DEVICES`` in the worker's process as soon
as its gateway exists (before pytest, let alone CUDA, starts there), and with
packing makes the :class:`~.packing.PackingScheduling` and feeds it what the
workers measure. :class:`Worker` runs in each worker: it checks its pinning
and tells the controller, through a file in a directory they share, which
tests are marked ``gpumem(exclusive=True)`` (the controller sees test ids
only).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections import Counter
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest

from pytest_gpumem.config.backend import resolve_backend
from pytest_gpumem.config.settings import Settings
from pytest_gpumem.core.atomic import write_atomic
from pytest_gpumem.core.gpus import DEFAULT_GPU, find_gpu
from pytest_gpumem.core.sample import Baseline, TestResult
from pytest_gpumem.core.store import BaselineStore
from pytest_gpumem.xdist.packing import Demand, PackingScheduling
from pytest_gpumem.xdist.pinning import ENV, PinningError, assign, group_for, groups, visible_devices, worker_index
from pytest_gpumem.xdist.probe import DeviceFacts, ProbeError, physical_memory, probe

DEVICES_KEY = "gpumem_devices"  # workerinput: the CUDA_VISIBLE_DEVICES a worker must see
SHARED_KEY = "gpumem_shared"  # workerinput: the directory workers leave their collection's facts in
PACK_KEY = "gpumem_pack"  # workerinput: whether the controller packs tests onto shared GPUs
EXCLUSIVE = "exclusive.json"


def is_xdist_run(config: pytest.Config) -> bool:
    """A pytest-xdist controller that starts workers (``-n``/``--tx``), or one of its workers."""
    if hasattr(config, "workerinput"):
        return True
    if not config.pluginmanager.hasplugin("xdist") or config.getoption("collectonly"):
        return False
    # The test xdist's own pytest_configure uses to start its distributed session, which may run after ours.
    return config.getoption("dist", "no") != "no" and bool(config.getoption("tx", None))


def worker_count(config: pytest.Config) -> int:
    from xdist.workermanage import parse_tx_spec_config

    return len(parse_tx_spec_config(config))  # -n 2 and --tx 2*popen alike


def visible_gpus() -> list[str]:
    """The GPUs the controller sees, as CUDA_VISIBLE_DEVICES tokens (counted without starting CUDA here)."""
    import torch

    return visible_devices(os.environ, torch.cuda.device_count())


def auto_workers(settings: Settings) -> int | None:
    """``-n auto`` on the cuda backend: one worker per GPU group (``--gpumem-gpus-per-worker N``, 1 by
    default), two with ``--gpumem-pack``; None (pytest-xdist's own count, the CPUs) otherwise."""
    if settings.gpus_per_worker is None and not settings.pack:
        return None
    if resolve_backend(settings.backend) != "cuda":
        return None
    count = max(1, len(groups(visible_gpus(), settings.gpus_per_worker or 1)))
    return 2 * count if settings.pack else count


class Controller:
    """The controller's side: pinning, and the packing scheduler."""

    def __init__(self, config: pytest.Config, settings: Settings, store: BaselineStore) -> None:
        self.config = config
        self.settings = settings
        self.store = store
        self.backend = resolve_backend(settings.backend)
        if self.backend == "estimate":
            raise PinningError(
                "--gpumem-pack and --gpumem-gpus-per-worker measure real devices, not the estimate backend"
            )
        self.workers = worker_count(config)
        self.groups: list[list[str]] = []
        if self.backend == "cuda":
            devices = visible_gpus()
            self.groups = groups(devices, settings.gpus_per_worker or 1)
            for index in range(self.workers):  # fail now, with a clear message, where the GPUs do not suffice
                assign(devices, settings.gpus_per_worker or 1, self.workers, index, settings.pack)
        self.shared = Path(tempfile.mkdtemp(prefix="gpumem-workers-"))
        self.scheduler: PackingScheduling | None = None
        self.facts: list[DeviceFacts] = []
        self.retried: dict[str, TestResult] = {}  # nodeid -> the result of its run beside other tests
        self.group_by_worker: dict[str, int] = {}
        self.down: set[str] = set()  # workers that left

    def describe(self) -> str:
        """The header line: how the workers are pinned, and whether they pack."""
        pinned = (
            f"{self.workers} workers on GPU groups {' '.join('[' + ','.join(g) + ']' for g in self.groups)}"
            if self.groups
            else f"{self.workers} workers sharing the cpu"
        )
        if not self.settings.pack:
            return pinned
        return f"{pinned}, packed by stored peaks with a margin of {self.settings.pack_margin}"

    def devices_of(self, worker_id: str) -> list[str] | None:
        return self.groups[self.group_of(worker_id)] if self.groups else None

    def group_of(self, worker_id: str) -> int:
        """Worker K's group is K mod the number of groups; a worker started in place of one that died
        (pytest-xdist numbers it on, past -n) takes the group with the fewest live workers."""
        if worker_id not in self.group_by_worker:
            try:
                index = worker_index(worker_id)
            except PinningError as exc:
                raise pytest.UsageError(f"--tx: {exc}: pinning needs pytest-xdist's own gw<N> ids") from None
            live = [g for w, g in self.group_by_worker.items() if w not in self.down]
            self.group_by_worker[worker_id] = group_for(index, self.workers, max(1, len(self.groups)), live)
        return self.group_by_worker[worker_id]

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        self.down.add(node.gateway.id)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_newgateway(self, gateway: Any) -> None:
        devices = self.devices_of(gateway.id)
        if devices is None:
            return
        # Runs in the worker's process before pytest is even imported there, so before CUDA can start.
        channel = gateway.remote_exec("import os\nname, value = channel.receive()\nos.environ[name] = value\n")
        channel.send((ENV, ",".join(devices)))
        channel.waitclose(60)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        devices = self.devices_of(node.gateway.id)
        node.workerinput[DEVICES_KEY] = None if devices is None else ",".join(devices)
        node.workerinput[SHARED_KEY] = str(self.shared)
        node.workerinput[PACK_KEY] = self.settings.pack

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> PackingScheduling | None:
        if not self.settings.pack:
            return None
        try:
            self.facts = self._device_facts()
        except ProbeError as exc:
            raise pytest.UsageError(str(exc)) from None
        margin = self.settings.pack_margin
        usable: dict[Hashable, int] = {group: f.total - margin.allowed(f.total) for group, f in enumerate(self.facts)}
        self.scheduler = PackingScheduling(
            self.workers,
            lambda node: self.group_of(node.gateway.id),
            usable,
            self._demand,
            self.resident,
            log=getattr(log, "gpumem", None),
            mismatch=self._report_mismatch,
        )
        return self.scheduler

    @property
    def resident(self) -> int:
        """What a worker keeps resident before its first test: as the probe measured it, or, where NVML
        could not see the probe's process, the CUDA context and workspaces measured on an H200."""
        measured = [f.resident for f in self.facts if f.resident is not None]
        if measured or self.backend != "cuda":
            return max(measured, default=0)

        return find_gpu(DEFAULT_GPU, "--gpumem-pack").context

    def _report_mismatch(self, first: Any, expected: list[str], node: Any, collected: list[str]) -> None:
        """A worker collected other tests than the first: a collection error, as pytest-xdist reports it."""
        from xdist.report import report_collection_diff

        message = report_collection_diff(expected, collected, first.gateway.id, node.gateway.id)
        report = pytest.CollectReport(node.gateway.id, "failed", longrepr=message, result=[])
        self.config.hook.pytest_collectreport(report=report)

    def _device_facts(self) -> list[DeviceFacts]:
        if self.backend == "cuda":
            facts = probe(self.groups)
            if self.settings.pack_capacity is not None:
                facts = [DeviceFacts(f.hardware, self.settings.pack_capacity, f.resident) for f in facts]
            return facts
        return [DeviceFacts("cpu", self.settings.pack_capacity or physical_memory(), 0)]

    @functools.cached_property
    def exclusive(self) -> set[str]:
        """The tests marked ``gpumem(exclusive=True)``, as the workers wrote them once collected (read when
        the scheduler first asks for demands, after every worker has collected)."""
        return _read_exclusive(self.shared)

    def _demand(self, nodeid: str) -> Demand:
        if nodeid in self.exclusive:
            return Demand(None, alone=True, reason="exclusive")
        hardware = self.facts[0].hardware if self.facts else "cpu"
        baseline = self.store.lookup(hardware, nodeid)
        if baseline is None:
            return Demand(None, alone=True, reason="no baseline")
        return Demand(need(baseline))

    # -- what the workers report

    def observe(self, report: pytest.TestReport, result: TestResult) -> None:
        """A worker's result: what that worker keeps resident, as measured when the test began."""
        node = getattr(report, "node", None)
        if self.scheduler is None or node is None:
            return
        before = result.sample.before
        if before.get("device"):
            resident = max(before["device"].values())  # NVML's count of the worker's own process
        else:
            resident = self.resident + max(before.get("reserved", before.get("allocated", {})).values(), default=0)
        self.scheduler.set_resident(node, resident)

    def retry_alone(self, report: pytest.TestReport, result: TestResult) -> bool:
        """Whether the test ran out of memory beside other tests and is queued again to run alone."""
        if self.scheduler is None or result.verdict.oom is None or report.nodeid in self.retried:
            return False
        if not self.scheduler.retry_alone(report.nodeid):
            return False
        self.retried[report.nodeid] = result
        return True

    def cleanup(self) -> None:
        for path in self.shared.glob("*"):
            path.unlink(missing_ok=True)
        self.shared.rmdir()


def need(baseline: Baseline) -> int:
    """What a test needs above what its worker keeps resident: the largest peak its baseline recorded, over
    its phases, metrics and devices (reserved and device use count, not only allocated bytes). The ranks a
    test starts add to its own process on the device they name (``rank1:cuda:0`` counts on ``cuda:0``)."""
    largest = 0
    for phase in [baseline.metrics, *baseline.phases.values()]:
        for per_device in phase.values():
            summed: Counter[str] = Counter()
            for device, nbytes in per_device.items():
                summed[device.split(":", 1)[1] if device.startswith("rank") else device] += nbytes
            largest = max(largest, *summed.values(), 0)
    return largest


def _read_exclusive(shared: Path) -> set[str]:
    for path in sorted(shared.glob(f"*-{EXCLUSIVE}")):
        try:
            return set(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return set()


class Worker:
    """A worker's side: check the pinning, and share which tests must run alone."""

    def __init__(self, config: pytest.Config) -> None:
        self.workerinput: dict[str, Any] = config.workerinput  # type: ignore[attr-defined]

    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        if self.workerinput.get(PACK_KEY):
            # A packed test that runs out of memory may be retried alone: whether it failed is the
            # controller's call, which still enforces -x/--maxfail; a worker would stop at the first.
            config.option.maxfail = 0
        devices = self.workerinput.get(DEVICES_KEY)
        if devices is None or os.environ.get(ENV) == devices:
            return
        import torch

        if torch.cuda.is_initialized():
            raise pytest.UsageError(
                f"--gpumem-gpus-per-worker: CUDA started in worker {self.workerinput['workerid']} before it "
                f"could be pinned to GPU(s) {devices} (a conftest that uses CUDA at import?)"
            )
        os.environ[ENV] = devices

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Before pytest-xdist tells the controller the collection is done (so the scheduler can read it)."""
        shared = self.workerinput.get(SHARED_KEY)
        if not shared:
            return
        exclusive = sorted(
            item.nodeid
            for item in session.items
            if (marker := item.get_closest_marker("gpumem")) is not None and marker.kwargs.get("exclusive") is True
        )
        write_atomic(Path(shared) / f"{self.workerinput['workerid']}-{EXCLUSIVE}", json.dumps(exclusive))
