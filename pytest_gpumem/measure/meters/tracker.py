"""The ``cpu`` backend: bytes of live tensor storages, on any device, without a GPU.

PyTorch keeps no allocation statistics for the CPU, so this meter counts for
itself. A ``TorchDispatchMode`` sees every ATen operator the test runs (the
autograd engine and optimizers included); an output whose schema says it does
not alias an input is a fresh storage, which is counted once, by storage, and
uncounted when its storage dies (a weak reference callback: PyTorch keeps one
Python object per storage for as long as the storage lives). Views, in-place
and ``out=`` results alias an input and cost nothing, so the count is exact to
the byte for what the test allocates. What it cannot see is memory no operator
made: tensors wrapped around foreign buffers (``torch.from_numpy``,
memory-mapped files) and scratch space inside a single kernel.

A dispatch mode is per thread, so the meter sees what the test's own thread
runs (autograd's backward included). transformers loads unquantized
checkpoints on a pool of worker threads; while it is active, the tracker sets
``HF_DEACTIVATE_ASYNC_LOAD=1`` so that it loads on the test's thread instead:
the same tensors, made where they can be counted.

The per-operator path is kept minimal, since it runs for every operator: one
dict lookup, keyed by the operator's C++ handle so that no Python ``__hash__``
runs, gives what to call and whether the operator can allocate at all; an
operator that cannot returns at once. What remains is mostly the dispatch
mode's own: five AdamW steps of a 256-1024-256 MLP run 390 operators, 117 of
which allocate; a dispatch mode that only runs them costs 3.2 ms on the 2-core
CPU machine (about 8 us an operator), and the tracker 1 ms more.

A device limit (a smaller GPU simulated on the CPU) is enforced here: an
allocation that would take a device's live bytes, with what earlier tests
left alive there (:func:`resident`), over the limit raises
:class:`DeviceLimitError`, and its output is dropped as if never made. It is
checked only when the count reaches a new peak, so it costs nothing below it.
A tracker that ends keeps counting the storages still alive: that is what its
test left behind (``TrackerMeter.leftover``).
"""

from __future__ import annotations

import os
import weakref
from functools import partial
from typing import Any

import torch
from torch._ops import OpOverload
from torch.utils._python_dispatch import TorchDispatchMode

from pytest_gpumem.core.sample import Peaks
from pytest_gpumem.core.units import format_bytes
from pytest_gpumem.measure.collector import collect_after_teardown, release_failures

_NOTHING: tuple[int, ...] = ()
WHOLE = -1
_ASYNC_LOAD = "HF_DEACTIVATE_ASYNC_LOAD"
_OPERATORS: dict[Any, tuple[Any, tuple[int, ...]]] = {}
"""An operator's C++ handle -> (what to call to run it, :func:`_fresh_returns`); schemas never change."""


def _fresh_returns(func: Any) -> tuple[int, ...]:
    """Which of ``func``'s results are newly allocated (alias no input).

    ``(WHOLE,)`` means the single result (a tensor or a list of tensors);
    otherwise the indices into the tuple of results.
    """
    schema = getattr(func, "_schema", None)
    if schema is None:
        return _NOTHING
    fresh = tuple(i for i, ret in enumerate(schema.returns) if ret.alias_info is None)
    return (WHOLE,) if fresh and len(schema.returns) == 1 else fresh


def _learn(func: Any) -> tuple[Any, tuple[int, ...]]:
    """What to call to run ``func`` and which of its results are fresh, kept in :data:`_OPERATORS`."""
    # An OpOverload's __call__ only forwards to its C++ handle: calling that saves a Python frame per
    # operator. Its subclasses (TorchBind operators) do more, and are called as they are.
    run = func._op if type(func) is OpOverload else func
    entry = _OPERATORS[func._op] = (run, _fresh_returns(func))
    return entry


WEIGHTS, GRADIENTS, OPTIMIZER, ACTIVATIONS = range(4)
"""Categories of a tracked storage; a storage starts as an activation (or temporary) and is
re-classified when it is seen to be a parameter, a gradient or optimizer state."""

ALIVE = float("inf")
_current_node = torch._C._current_autograd_node
_DEVICE_NAMES: dict[torch.device, str] = {}


def _device_name(device: torch.device) -> str:
    """``str(device)``, made once per device: formatting it anew for every storage costs more than the rest."""
    name = _DEVICE_NAMES.get(device)
    if name is None:
        name = _DEVICE_NAMES[device] = str(device)
    return name


def block_size(nbytes: int) -> int:
    """What PyTorch's CUDA caching allocator charges for a request: at least 512 bytes, in 512-byte
    blocks (and nothing for an empty tensor)."""
    return 0 if nbytes == 0 else max(512, (nbytes + 511) // 512 * 512)


class DeviceLimitError(torch.OutOfMemoryError):
    """An allocation that would take a device over the tracker's limit (a smaller GPU simulated).

    A subclass of ``torch.OutOfMemoryError``, which ``torch.cuda.OutOfMemoryError``
    is: code that catches CUDA's error (an OOM retry loop, say) catches this one
    the same way. It carries the numbers: ``requested`` bytes on ``device``,
    ``allocated`` bytes per device (what the meter counts of this test and what
    earlier tests left alive), the ``limit``, and the moment (``seq``) and place
    (``where``: phase, stage, module) of the failure.
    """

    def __init__(
        self, device: str, requested: int, allocated: dict[str, int], limit: int, seq: int, where: tuple[Any, ...]
    ) -> None:

        used = allocated.get(device, 0)
        super().__init__(
            f"Out of memory under the device limit of {format_bytes(limit)} on {device} (pytest-gpumem). "
            f"Tried to allocate {format_bytes(requested)}; {format_bytes(used)} is allocated, "
            f"{format_bytes(max(0, limit - used))} is free."
        )
        self.device, self.requested, self.allocated, self.limit = device, requested, allocated, limit
        self.seq, self.where = seq, where

    def __reduce__(self) -> Any:
        fields = (self.device, self.requested, self.allocated, self.limit, self.seq, self.where)
        return (type(self), fields)


class _Refused(Exception):
    """Raised inside the tracker to abandon an operator whose output went over the limit (see __torch_dispatch__)."""

    def __init__(self, error: DeviceLimitError) -> None:
        super().__init__()
        self.error = error


_ENDED: list[StorageTracker] = []
"""Trackers of the cpu backend that stopped with storages still alive: what earlier tests left behind."""


def resident(exclude: StorageTracker | None = None) -> dict[str, int]:
    """Bytes per device still alive of what ended trackers counted: on the cpu backend, the counterpart of
    what the CUDA allocator holds from earlier tests, so that a device limit counts it too."""
    totals: dict[str, int] = {}
    alive = [tracker for tracker in _ENDED if tracker._live]
    _ENDED[:] = alive
    for tracker in alive:
        if tracker is not exclude:
            for device, nbytes in tracker.current.items():
                totals[device] = totals.get(device, 0) + nbytes
    return totals


class StorageTracker(TorchDispatchMode):
    """Counts live bytes per device of the storages created while it is active, with their peak.

    With ``attribute=True`` it also keeps a record of every storage (its bytes,
    device, when it was made and freed, its category, and whether a decoder
    layer's forward made it), and the moment of the peak of a window (the
    call phase) and of each stage within it, so that :meth:`breakdown` can
    later split the bytes alive at that moment by consumer. Re-classifying a
    storage (a parameter seen in a forward, a gradient seen by the optimizer)
    changes its record, so a breakdown is right even for a peak reached
    before the storage's role was known. ``phase``, ``stage_override``,
    ``module_stack`` and ``layer_depth`` are kept current by the attributor's
    hooks.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Otherwise TorchDispatchMode wraps __torch_dispatch__ in a dynamo-disabling
        # shim: a second Python frame per operator and an import of torch._dynamo.
        return False

    def __init__(self, attribute: bool = False, allocator_blocks: bool = False, meta_device: str | None = None) -> None:
        super().__init__()
        # The estimate backend's fake GPU: count meta storages as this device, and nothing else.
        self.meta_device = meta_device
        self._live: dict[int, tuple[weakref.ref, list[Any]]] = {}
        self.current: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.attribute = attribute
        self.allocator_blocks = allocator_blocks  # round to the CUDA allocator's blocks (its own count)
        self.seq = 0
        self.records: list[list[Any]] = []  # [nbytes, device, made, freed, category, in_layer]
        self.window: dict[str, tuple[int, int, tuple[str, str, Any]]] | None = None  # device -> (bytes, seq, where)
        self.stage_peaks: dict[str, dict[str, tuple[int, int]]] = {}  # stage -> device -> (bytes, seq)
        self._async_load: str | None = None
        self.phase = ""
        self.stage_override = ""
        self.module_stack: list[int] = []
        self.layer_depth = 0
        # A device limit (None: none): an allocation that takes a device's live bytes, with what earlier
        # tests left there (``base``), over it raises DeviceLimitError. Checked only at a new peak.
        self.limit: int | None = None
        self.base: dict[str, int] = {}
        self.last_oom: tuple[int, tuple[str, str, Any]] | None = None  # (seq, where) of the last OOM seen

    def __enter__(self) -> StorageTracker:
        # A dispatch mode sees its own thread only: have transformers load on it (see the module docstring).
        self._async_load = os.environ.get(_ASYNC_LOAD)
        os.environ[_ASYNC_LOAD] = "1"
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if self._async_load is None:
            os.environ.pop(_ASYNC_LOAD, None)
        else:
            os.environ[_ASYNC_LOAD] = self._async_load

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        entry = _OPERATORS.get(func._op)
        if entry is None:
            entry = _learn(func)
        run, fresh = entry
        try:
            out = run(*args, **kwargs) if kwargs else run(*args)
        except torch.OutOfMemoryError:
            self.last_oom = (self.seq, self.location())  # the moment of a CUDA OOM, for its attribution
            raise
        if fresh:
            try:
                if isinstance(out, torch.Tensor):
                    self._count(out)
                elif fresh[0] == WHOLE:
                    self._count_each(out)
                else:
                    for i in fresh:
                        self._count_each(out[i])
            except _Refused as refused:
                error = refused.error
            else:
                return out
            # Out of the except block, so that nothing (the internal exception's traceback) keeps the refused
            # output alive: it dies here, as if it had never been allocated.
            del out
            raise error
        return out

    def location(self) -> tuple[str, str, Any]:
        """Where the test is now: (phase, stage, module), the module as an id or an autograd node's name."""
        node = _current_node()
        stage = "backward" if node is not None else self.stage_override or ("forward" if self.module_stack else "")
        module = node.name() if node is not None else (self.module_stack[-1] if self.module_stack else None)
        return (self.phase, stage, module)

    def _refuse(self, device: str, nbytes: int) -> None:
        """Raise _Refused if ``nbytes`` more on ``device`` go over the limit, counting what earlier tests left
        alive as it is now (it may have been freed since the tracker began)."""
        assert self.limit is not None
        self.base = resident(exclude=self)
        if self.current.get(device, 0) + self.base.get(device, 0) + nbytes <= self.limit:
            return
        devices = set(self.current) | set(self.base)
        allocated = {d: self.current.get(d, 0) + self.base.get(d, 0) for d in sorted(devices)}
        self.last_oom = (self.seq, self.location())
        raise _Refused(DeviceLimitError(device, nbytes, allocated, self.limit, self.seq, self.last_oom[1]))

    def _count_each(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            self._count(value)
        elif isinstance(value, (tuple, list)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    self._count(item)

    def _count(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # sparse and wrapper tensors own no storage; their parts are counted where made
        key = storage._cdata
        if key in self._live:
            return
        device = "cpu" if tensor.is_cpu else _device_name(storage.device)
        if device == "meta":
            if self.meta_device is None:
                return
            device = self.meta_device
        elif self.meta_device is not None:
            self._elsewhere(device, storage.nbytes())
            return
        nbytes = storage.nbytes()
        if self.allocator_blocks and device != "cpu":
            nbytes = self._charge(key, nbytes)
        now = self.current.get(device, 0) + nbytes
        if now > self.peak.get(device, 0):
            # Below the peak, every level was already checked against the limit: only a new peak can pass it.
            if self.limit is not None and now + self.base.get(device, 0) > self.limit:
                self._refuse(device, nbytes)
            self.peak[device] = now
        self.seq += 1
        record = [nbytes, device, self.seq, ALIVE, ACTIVATIONS, self.layer_depth > 0]
        self._live[key] = (weakref.ref(storage, partial(self._release, key)), record)
        self.current[device] = now
        if self.attribute:
            self.records.append(record)
            if self.window is not None:
                self._note(device, now)

    def _note(self, device: str, now: int) -> None:
        """Keep the moment of the window's peak and of each stage's peak on ``device``."""
        node = _current_node()
        stage = "backward" if node is not None else self.stage_override or ("forward" if self.module_stack else "")
        peaks = self.stage_peaks.get(stage)
        if peaks is None:
            peaks = self.stage_peaks[stage] = {}
        best = peaks.get(device)
        if best is None or now > best[0]:
            peaks[device] = (now, self.seq)
        window = self.window
        assert window is not None
        best_window = window.get(device)
        if best_window is None or now > best_window[0]:
            module: Any = node.name() if node is not None else (self.module_stack[-1] if self.module_stack else None)
            window[device] = (now, self.seq, (self.phase, stage, module))

    def _elsewhere(self, device: str, nbytes: int) -> None:
        """A storage made off the fake device (with ``meta_device`` set): not counted; see the estimate meter."""

    def _charge(self, key: int, nbytes: int) -> int:
        """What the device's allocator charges for a new storage of ``nbytes`` (its 512-byte blocks)."""
        return block_size(nbytes)

    def _release(self, key: int, _ref: object = None) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            record = entry[1]
            self.current[record[1]] -= record[0]
            self.seq += 1
            record[3] = self.seq

    def restart_peak(self) -> dict[str, int]:
        """The peak per device since the last restart; the next one starts at the current level."""
        peak = dict(self.peak)
        self.peak = dict(self.current)
        return peak

    def restart_window(self) -> None:
        """Start the window whose peak is attributed (the call phase): its peaks start at the current level."""
        self.window = {device: (now, self.seq, (self.phase, "", None)) for device, now in self.current.items()}
        self.stage_peaks = {}

    def classify(self, tensor: Any, category: int) -> None:
        """Record that ``tensor``'s storage is a weight, a gradient or optimizer state (if it is tracked)."""
        try:
            entry = self._live.get(tensor.untyped_storage()._cdata)
        except (AttributeError, RuntimeError, NotImplementedError):
            return
        if entry is not None:
            entry[1][4] = category

    def tracks(self, tensor: Any) -> bool:
        """Whether ``tensor``'s storage was made while the tracker ran, and is alive."""
        try:
            return tensor.untyped_storage()._cdata in self._live
        except (AttributeError, RuntimeError, NotImplementedError):
            return False

    def breakdown(self, device: str, seq: int) -> list[int]:
        """Bytes on ``device`` alive at moment ``seq``, per category, plus the layer-made activations."""
        totals = [0, 0, 0, 0, 0]
        for nbytes, where, made, freed, category, in_layer in self.records:
            if where == device and made <= seq < freed:
                totals[category] += nbytes
                if category == ACTIVATIONS and in_layer:
                    totals[4] += nbytes
        return totals

    def forget(self) -> None:
        """Stop tracking: dropping the weak references also drops their callbacks."""
        self._live.clear()
        self.records = []


class TrackerMeter:
    """Meter of the ``cpu`` backend; see the module docstring for what it counts."""

    backend = "cpu"
    metrics: tuple[str, ...] = ("allocated", "reserved")

    def __init__(self, attribute: bool = True) -> None:
        self._tracker: StorageTracker | None = None
        self._attribute = attribute
        self._limit: int | None = None
        self._last: StorageTracker | None = None  # the last test's tracker, still counting what it left alive

    @property
    def tracker(self) -> StorageTracker | None:
        """The running tracker, for attribution (None outside begin/end or without attribution)."""
        return self._tracker if self._attribute else None

    def set_limit(self, limit: int | None) -> None:
        """Cap every device at ``limit`` bytes from the next ``begin`` (and now, if measuring): live storages,
        with what earlier tests left alive, may not go over it. None lifts the cap."""
        self._limit = limit
        if self._tracker is not None:
            self._tracker.limit = limit
            self._tracker.base = resident() if limit is not None else {}

    def begin(self) -> Peaks:
        release_failures()
        self._tracker = StorageTracker(attribute=self._attribute)
        self._tracker.current["cpu"] = 0
        self._tracker.peak["cpu"] = 0
        self.set_limit(self._limit)
        self._tracker.__enter__()
        return {}

    def mark(self) -> Peaks:
        assert self._tracker is not None, "mark() outside begin()/end()"
        peak = self._tracker.restart_peak()
        # No caching pool on the CPU: what is reserved is what is allocated.
        return {"allocated": peak, "reserved": dict(peak)}

    def end(self) -> None:
        if self._tracker is not None:
            tracker = self._tracker
            tracker.__exit__(None, None, None)
            # The attribution's records go; the storages still alive stay counted, so that what the test
            # leaves behind is known (leftover) and counts against later tests' device limits (resident).
            tracker.records = []
            if tracker._live:
                _ENDED.append(tracker)
            self._last = tracker
            self._tracker = None

    def in_use(self) -> dict[str, int]:
        """Bytes per device alive now of what every tracker counted, as a device limit counts them."""
        totals = resident()
        if self._tracker is not None:
            for device, nbytes in self._tracker.current.items():
                totals[device] = totals.get(device, 0) + nbytes
        return totals

    def leftover(self) -> dict[str, int]:
        """Bytes per device still alive of what the last measured test made, after a full collection (and
        dropping what pytest keeps of a failure): call it after the test's teardown."""
        collect_after_teardown()
        return {device: n for device, n in (self._last.current if self._last else {}).items() if n > 0}
