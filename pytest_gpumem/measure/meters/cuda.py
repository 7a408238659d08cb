"""The ``cuda`` backend: the caching allocator's own statistics, plus NVML.

The measurement costs nothing per allocation: the allocator already keeps the
current and peak ``allocated`` and ``reserved`` bytes of every device, so a
test costs a reset before it and a few reads at each phase boundary. ``device``
is what NVML says the device has in use (the CUDA context and library
workspaces included, and other processes' memory too), or with
``own_process`` (workers that share a GPU under packing) what NVML counts
of this process alone; NVML has no peak, so it
is read at every phase boundary, where the caching allocator still holds what
the phase reserved.

For the attribution, a storage tracker (see :mod:`.tracker`) runs beside the
allocator, counting in the allocator's 512-byte blocks: it costs Python work
per operator, and ``CudaMeter(attribute=False)`` leaves it out. The
allocator's statistics stay the measurement either way.

The statistics are read through ``torch.cuda`` as the allocator keeps them (ROCm appears as ``cuda``): one
nested dict per device and boundary (see :func:`allocator_stats`).

A device limit goes through the allocator's per-process memory fraction: it
caps what the allocator reserves, for the whole process; the CUDA context and
libraries' own memory stay outside it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from pytest_gpumem.core.sample import Peaks, touched
from pytest_gpumem.core.units import format_bytes
from pytest_gpumem.measure.collector import collect_after_teardown, release_failures
from pytest_gpumem.measure.meters import oom_observer
from pytest_gpumem.measure.meters.tracker import StorageTracker


def nvml_handle(index: int) -> Any:
    """The NVML handle of torch's CUDA device ``index``, matched by UUID: NVML numbers devices its own way
    and ignores CUDA_VISIBLE_DEVICES. torch gives the UUID without its prefix, which is ``GPU-`` for a
    whole GPU and ``MIG-`` for a MIG instance. Needs ``pynvml.nvmlInit()``; raises NVMLError if unknown."""
    import pynvml

    uuid = str(torch.cuda.get_device_properties(index).uuid)
    if uuid.startswith(("GPU-", "MIG-")):
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    except pynvml.NVMLError:
        return pynvml.nvmlDeviceGetHandleByUUID(f"MIG-{uuid}")


def _nvml_handles(count: int) -> list[Any] | None:
    """NVML handles for torch's devices 0..count-1, or None where NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return [nvml_handle(index) for index in range(count)]
    except Exception:  # noqa: BLE001 - any NVML failure only costs the device metric
        return None


def process_used(handles: list[Any]) -> list[int] | None:
    """What NVML counts of this process's own use on each device (its context, libraries and allocator
    reservations, not other processes'), or None where NVML does not list this process on any device."""
    import os

    import pynvml

    pid = os.getpid()
    used = []
    for handle in handles:
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        # usedGpuMemory is None where NVML cannot tell a process's use (MIG, some vGPUs): unknown, not 0.
        mine = [p.usedGpuMemory for p in processes if p.pid == pid]
        used.append(int(mine[0]) if mine and mine[0] is not None else -1)
    if all(n < 0 for n in used):
        return None
    return [max(n, 0) for n in used]


def _warm_up(device: str) -> None:
    """Create what CUDA and its libraries keep for the life of the process, so no test is charged for it.

    The context, and the cuBLAS/cuBLASLt workspaces that the caching allocator
    hands out on a thread's first matrix product and keeps: one for this thread
    and one for the autograd engine's thread of the device, which runs backward.
    """
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.ones(16, 16, device=device, dtype=dtype, requires_grad=True)
        torch.nn.functional.linear(a, a, a[0]).sum().backward()
        (a @ a).sum().item()
    torch.accelerator.synchronize(torch.device(device).index)


def _warm_up_bitsandbytes(device: str) -> None:
    """Make what bitsandbytes keeps for the life of the process on first use: the dynamic quantization map
    (1 KiB) that double quantization and 8-bit blockwise quantization cache on the device they first run on.
    Otherwise whichever test quantizes first in a process pays for it, and a test's peak would depend on
    the order tests run in (under pytest-xdist, on which worker runs what)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return
    try:
        from bitsandbytes import functional
    except Exception:  # noqa: BLE001 - a bitsandbytes that cannot load here is one no test can use either
        return
    functional.quantize_blockwise(torch.ones(256, device=device))
    torch.accelerator.synchronize(torch.device(device).index)


class AllocatorStats(NamedTuple):
    allocated: int
    allocated_peak: int
    reserved: int
    reserved_peak: int


def allocator_stats(index: int) -> AllocatorStats:
    """The caching allocator's current and peak ``allocated`` and ``reserved`` bytes of device ``index``, from
    one read of its statistics as the allocator keeps them (nested): ``memory_allocated`` and its kin each
    flatten the whole statistics dict in Python to return one number, which made them most of what
    measuring a small test cost (see docs/overhead.md)."""
    stats = torch.cuda.memory.memory_stats_as_nested_dict(index)
    allocated, reserved = (
        stats.get("allocated_bytes", {}).get("all", {}),
        stats.get("reserved_bytes", {}).get("all", {}),
    )
    return AllocatorStats(
        int(allocated.get("current", 0)),
        int(allocated.get("peak", 0)),
        int(reserved.get("current", 0)),
        int(reserved.get("peak", 0)),
    )


class CudaMeter:
    """Meter of the ``cuda`` backend: per device, allocator peaks and NVML device use."""

    backend = "cuda"

    def __init__(self, attribute: bool = True, own_process: bool = False) -> None:
        self._attribute = attribute
        self._own_process = own_process
        self.tracker: StorageTracker | None = None
        self.devices = list(range(torch.cuda.device_count()))
        self.names = [f"cuda:{index}" for index in self.devices]
        for name in self.names:
            _warm_up(name)
        if self.names:
            _warm_up_bitsandbytes(self.names[0])
        self._nvml = _nvml_handles(len(self.devices))
        if own_process and self._nvml and not process_used(self._nvml):
            self._nvml = None  # NVML does not list this process (a container's own PID namespace): no device metric
        self.metrics: tuple[str, ...] = ("allocated", "reserved") + (("device",) if self._nvml else ())
        self._before: Peaks = {}
        self._last_before: Peaks = {}  # the last test's, to tell what it left allocated
        self._fractions: dict[int, float] = {}  # each device's memory fraction before a limit was set
        oom_observer.watch_cuda()

    def _device_used(self) -> dict[str, int]:
        import pynvml

        assert self._nvml is not None
        if self._own_process:
            return dict(zip(self.names, process_used(self._nvml) or [0] * len(self.names), strict=True))
        handles = zip(self.names, self._nvml, strict=True)
        return {name: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) for name, handle in handles}

    def set_limit(self, limit: int | None) -> None:
        """Cap each device's caching allocator at ``limit`` bytes (a smaller GPU simulated), through its
        per-process memory fraction; None puts the fraction back as it was. The cap is on what the allocator
        reserves for the whole process (earlier tests' leftovers included); the CUDA context and what
        libraries take outside the allocator are not under it. ValueError for a limit above a device's memory.
        """

        for index, name in zip(self.devices, self.names, strict=True):
            if limit is None:
                if index in self._fractions:
                    torch.cuda.set_per_process_memory_fraction(self._fractions.pop(index), index)
                continue
            total = torch.cuda.get_device_properties(index).total_memory
            if limit > total:
                raise ValueError(
                    f"device_limit {format_bytes(limit)} is more than {name}'s {format_bytes(total)}: "
                    "a limit can only simulate a smaller device"
                )
            if index not in self._fractions:
                get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
                self._fractions[index] = float(get(index)) if get is not None else 1.0
            torch.cuda.set_per_process_memory_fraction(limit / total, index)

    def begin(self) -> Peaks:
        release_failures()
        oom_observer.forget_observed()
        memory = torch.accelerator.memory
        for index in self.devices:
            torch.accelerator.synchronize(index)
        torch.accelerator.memory.empty_cache()
        before: Peaks = {"allocated": {}, "reserved": {}}
        for index, name in zip(self.devices, self.names, strict=True):
            memory.reset_peak_memory_stats(index)
            stats = allocator_stats(index)
            before["allocated"][name] = stats.allocated
            before["reserved"][name] = stats.reserved
        if self._nvml:
            before["device"] = self._device_used()
        self._before = before
        if self._attribute:
            # Attribution only: the allocator's own statistics stay the measurement.
            self.tracker = StorageTracker(attribute=True, allocator_blocks=True)
            self.tracker.__enter__()
        return before

    def mark(self) -> Peaks:
        memory = torch.accelerator.memory
        peaks: Peaks = {"allocated": {}, "reserved": {}}
        for index, name in zip(self.devices, self.names, strict=True):
            stats = allocator_stats(index)
            memory.reset_peak_memory_stats(index)
            peaks["allocated"][name] = stats.allocated_peak - self._before["allocated"][name]
            peaks["reserved"][name] = stats.reserved_peak - self._before["reserved"][name]
        if self._nvml:
            before = self._before["device"]
            peaks["device"] = {name: used - before[name] for name, used in self._device_used().items()}
        return touched(peaks, self.names[0]) if self.names else peaks

    def end(self) -> None:
        if self._before:
            self._last_before, self._before = self._before, {}
        if self.tracker is not None:
            self.tracker.__exit__(None, None, None)
            self.tracker.forget()
            self.tracker = None

    def in_use(self) -> dict[str, int]:
        """Bytes allocated now on each device (what a device limit's cap is checked against, with the cache)."""
        return {name: allocator_stats(index).allocated for index, name in zip(self.devices, self.names, strict=True)}

    def leftover(self) -> dict[str, int]:
        """Bytes per device still allocated above what was resident before the last measured test began,
        after a full collection (dropping what pytest keeps of a failure) and emptying the allocator's cache:
        call it after the test's teardown."""
        collect_after_teardown()
        for index in self.devices:
            torch.accelerator.synchronize(index)
        torch.accelerator.memory.empty_cache()
        before = self._last_before.get("allocated", {})
        left = {
            name: allocator_stats(index).allocated - before.get(name, 0)
            for index, name in zip(self.devices, self.names, strict=True)
        }
        return {name: n for name, n in left.items() if n > 0}
