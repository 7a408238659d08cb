"""Per-rank peaks of the child processes a measured test starts (torchrun, ``torch.multiprocessing.spawn``).

Allocator statistics and the storage tracker are per process, so the test's
own meter sees nothing of its children. While a test is measured, a
:class:`RankDirectory` is announced to them through ``GPUMEM_RANKS_DIR`` (and
the backend through ``GPUMEM_RANKS_BACKEND``), which every child inherits. A
rank process calls :func:`measure_rank` once, early; when it exits it writes
``rank-<RANK>-<pid>.json`` there (the pid keeps two runs of the same rank in
one test apart). The parent merges what appeared at each phase boundary, so a
rank's peaks land in the phase that was open when it exited, under device
keys ``rank<R>:cuda:<i>`` (the index as the child saw it) or ``rank<R>:cpu``.
A child starts from nothing, so its peaks are absolute bytes.

The directory of a measurement is a fresh path under one private directory
made once per process (``mkdtemp``: only this user can create anything in
it), and the first rank that writes creates it: a test that starts no child
process costs no file system work.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pytest_gpumem.core.sample import Peaks, merge_max
from pytest_gpumem.measure.meters.cuda import nvml_handle, process_used
from pytest_gpumem.measure.meters.tracker import TrackerMeter

ENV = "GPUMEM_RANKS_DIR"
BACKEND_ENV = "GPUMEM_RANKS_BACKEND"
_PATTERN = ("rank-", ".json")

_announcer: int | None = None
"""The pid of this process while it announces a directory: it is the parent, not a rank, so
:func:`measure_rank` called in it (a test running a training script's ``main`` in-process) does
nothing. A forked child keeps the value but has another pid, and is measured."""

_measuring: RankMeasurement | None = None  # this process's measurement as a rank
_base: tuple[int, Path] | None = None  # (pid, directory) under which this process announces directories
_serial = itertools.count()


def _fresh_directory() -> Path:
    """A path no measurement of this process announced before, under this process's private directory."""
    global _base
    if _base is None or _base[0] != os.getpid():  # a forked child makes its own
        _base = (os.getpid(), Path(tempfile.mkdtemp(prefix="gpumem-ranks-")))
        atexit.register(_remove_base, *_base)
    return _base[1] / str(next(_serial))


def _remove_base(pid: int, base: Path) -> None:
    if os.getpid() == pid:  # not from a forked child that exits normally
        shutil.rmtree(base, ignore_errors=True)


class RankFileError(ValueError):
    """A rank file that cannot be read: the parent would otherwise under-report without saying so."""


# --- parent side -------------------------------------------------------------------------------------


def collect(directory: str | Path, seen: set[str] | None = None) -> Peaks:
    """The peaks in every rank file of ``directory``, keyed ``rank<R>:<device>``; RankFileError for a
    corrupt or unreadable one. Names in ``seen`` are skipped, and those read are added to it, so that a
    file is collected once. A directory that does not exist yet (no rank wrote) holds nothing."""
    peaks: Peaks = {}
    try:
        listed = os.listdir(directory)
    except FileNotFoundError:
        return peaks
    names = sorted(n for n in listed if n.startswith(_PATTERN[0]) and n.endswith(_PATTERN[1]))
    for name in names:
        if seen is not None:
            if name in seen:
                continue
            seen.add(name)  # before reading: a corrupt file raises once, not at every later boundary
        merge_max(peaks, read(Path(directory, name)))
    return peaks


def read(path: Path) -> Peaks:
    """One rank file's peaks, keyed ``rank<R>:<device>``; RankFileError naming the file if it is corrupt."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RankFileError(f"gpumem: rank file {path} cannot be read: {exc}") from exc
    rank = data.get("rank") if isinstance(data, dict) else None
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise RankFileError(f"gpumem: rank file {path} has no integer 'rank'")
    found = data.get("peaks")
    if not isinstance(found, dict) or not all(
        isinstance(per_device, dict)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in per_device.values())
        for per_device in found.values()
    ):
        raise RankFileError(f"gpumem: rank file {path}: 'peaks' is not {{metric: {{device: bytes}}}}")
    return {
        metric: {f"rank{rank}:{device}": v for device, v in per_device.items()} for metric, per_device in found.items()
    }


class RankDirectory:
    """The parent's side: a fresh directory announced to child processes for as long as it is open
    (created by the first rank that writes).

    ``backend`` is the parent's (cuda or cpu): children measure the same way,
    so that a test forced onto the cpu backend on a GPU machine gets CPU peaks
    from its ranks too. :meth:`close` puts the environment back as it was and
    removes the directory.
    """

    def __init__(self, backend: str) -> None:
        global _announcer
        self.path = _fresh_directory()
        self._seen: set[str] = set()
        self._saved: dict[str, str | None] | None = {name: os.environ.get(name) for name in (ENV, BACKEND_ENV)}
        self._announcer = _announcer
        os.environ[ENV] = str(self.path)
        os.environ[BACKEND_ENV] = backend
        _announcer = os.getpid()

    def collect(self) -> Peaks:
        """The peaks of the rank files that appeared since the last call."""
        return collect(self.path, self._seen)

    def close(self) -> None:
        """Put the environment back and remove the directory; again, it does nothing."""
        global _announcer
        if self._saved is None:
            return
        saved, self._saved = self._saved, None
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _announcer = self._announcer
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


# --- child side --------------------------------------------------------------------------------------


def _int_env(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise ValueError(
                    f"gpumem.measure_rank: {name}={value!r} in the environment is not an integer"
                ) from None
    return default


class _CudaPeaks:
    """The caching allocator's peaks on every visible device, and this process's NVML use."""

    backend = "cuda"

    def __init__(self) -> None:
        import torch

        # Nothing here may start CUDA (not even count devices): a rank that pins itself afterwards
        # (CUDA_VISIBLE_DEVICES from LOCAL_RANK) must still be able to. Before CUDA is initialized the
        # statistics are zero; reset them only if something already used it.
        if torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                torch.accelerator.memory.reset_peak_memory_stats(index)

    def read(self) -> Peaks:
        import torch

        memory = torch.accelerator.memory
        peaks: Peaks = {"allocated": {}, "reserved": {}}
        if not torch.cuda.is_initialized():
            return peaks  # this rank never used CUDA
        for index in range(torch.cuda.device_count()):
            reserved = memory.max_memory_reserved(index)
            if reserved:  # only the devices this rank used
                peaks["allocated"][f"cuda:{index}"] = memory.max_memory_allocated(index)
                peaks["reserved"][f"cuda:{index}"] = reserved
        used = _process_used([int(name.split(":")[1]) for name in peaks["reserved"]])
        if used:
            peaks["device"] = used
        return peaks

    def end(self) -> None:
        pass


def _process_used(indices: list[int]) -> dict[str, int]:
    """What NVML says this process uses on each device; empty where it cannot tell (no NVML, or the pid
    not visible, as in containers with their own pid namespace)."""
    if not indices:
        return {}
    try:
        import pynvml

        pynvml.nvmlInit()
        used = process_used([nvml_handle(index) for index in indices]) or []
    except Exception:  # noqa: BLE001 - any NVML failure only costs the device metric
        return {}
    return {f"cuda:{index}": n for index, n in zip(indices, used, strict=False) if n > 0}


class _CpuPeaks:
    """Live tensor storages, counted by the storage tracker on the thread that started it."""

    backend = "cpu"

    def __init__(self) -> None:

        self._meter = TrackerMeter(attribute=False)
        self._meter.begin()

    def read(self) -> Peaks:
        return self._meter.mark()

    def end(self) -> None:
        self._meter.end()


class RankMeasurement:
    """A rank process being measured; :func:`measure_rank` returns it. ``with`` it, or let it write at exit.

    Inert (``directory`` None) outside a measured test, or where this process
    is already measured or is the test's own process.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.path: Path | None = None  # the rank file, once written
        self._meter: _CudaPeaks | _CpuPeaks | None = None
        self._thread = threading.get_ident()
        if directory is not None:
            self._meter = _CudaPeaks() if os.environ.get(BACKEND_ENV) == "cuda" else _CpuPeaks()
            atexit.register(self.close)

    def __enter__(self) -> RankMeasurement:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> Path | None:
        """Stop measuring and write the rank file (once); returns its path, None where inert or not
        written. A file that cannot be written (the test already ended) is only warned about: the rank's
        own work succeeded."""
        global _measuring
        meter, self._meter = self._meter, None
        if meter is None or self.directory is None:
            return self.path
        atexit.unregister(self.close)
        if _measuring is self:
            _measuring = None
        peaks = meter.read()
        if threading.get_ident() == self._thread:  # a dispatch mode can only be left on its own thread
            meter.end()
        rank = _int_env("RANK", "LOCAL_RANK", default=0)
        data = {
            "rank": rank,
            "world_size": _int_env("WORLD_SIZE", "LOCAL_WORLD_SIZE", default=1),
            "pid": os.getpid(),
            "backend": meter.backend,
            "peaks": peaks,
        }
        stem, n = f"{_PATTERN[0]}{rank}-{os.getpid()}", 1
        path = self.directory / f"{stem}{_PATTERN[1]}"
        while path.exists():  # this process measured before (a worker reused): keep both
            n += 1
            path = self.directory / f"{stem}-{n}{_PATTERN[1]}"
        try:
            # The first rank to write creates it; not its parent, which is gone when the test process is.
            self.directory.mkdir(exist_ok=True)
            # Written whole, then renamed: the parent never reads half a file.
            with tempfile.NamedTemporaryFile("w", dir=self.directory, prefix=".rank-", delete=False) as file:
                json.dump(data, file, sort_keys=True)
            os.replace(file.name, path)
        except OSError as exc:
            print(f"gpumem: rank {rank} could not write its peaks to {self.directory}: {exc}", file=sys.stderr)
            return None
        self.path = path
        return path


def measure_rank() -> RankMeasurement:
    """Measure this rank process until it exits: call it once, first thing in the script each rank runs.

    Outside a measured test (``GPUMEM_RANKS_DIR`` unset) it does nothing, so
    scripts run unchanged. Otherwise it resets the peaks (CUDA allocator, or
    the storage tracker on the cpu backend: call it on the thread that does
    the rank's work) and writes them when the process exits. As a context
    manager, ``with measure_rank(): ...`` writes them when the block ends
    (what ``gpumem.spawn`` does). The rank is ``RANK``, else ``LOCAL_RANK``,
    else 0. A second call in a measured process returns an inert handle.
    """
    global _measuring
    directory = os.environ.get(ENV)
    if not directory or _measuring is not None or _announcer == os.getpid():
        return RankMeasurement()
    _measuring = RankMeasurement(Path(directory))
    return _measuring


def _run_rank(index: int, fn: Callable[..., Any], nprocs: int, args: Sequence[Any]) -> Any:
    """A spawned child: rank ``index`` of ``nprocs``, measured while ``fn`` runs (module level: picklable)."""
    # Set, not defaulted: a pytest itself started under torchrun (or a cluster's launcher) has RANK set,
    # and every child would otherwise claim the parent's rank.
    os.environ["RANK"] = str(index)
    os.environ["WORLD_SIZE"] = str(nprocs)
    with measure_rank():
        return fn(index, *args)


def spawn(fn: Callable[..., Any], nprocs: int, args: Sequence[Any] = (), **kwargs: Any) -> Any:
    """``torch.multiprocessing.spawn(fn, args, nprocs, **kwargs)`` with every child measured as a rank."""
    import torch.multiprocessing

    return torch.multiprocessing.spawn(_run_rank, args=(fn, nprocs, tuple(args)), nprocs=nprocs, **kwargs)
