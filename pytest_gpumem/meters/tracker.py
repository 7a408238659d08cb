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
checkpoints on a pool of worker threads; while measuring, the meter sets
``HF_DEACTIVATE_ASYNC_LOAD=1`` so that it loads on the test's thread instead:
the same tensors, made where they can be counted.

The per-operator path is kept minimal, since it runs for every operator: one
dict lookup decides whether an operator can allocate at all.
"""

from __future__ import annotations

import os
import weakref
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..sample import Peaks
from . import release_failures

_NOTHING: tuple[int, ...] = ()
WHOLE = -1
_ASYNC_LOAD = "HF_DEACTIVATE_ASYNC_LOAD"
_FRESH: dict[Any, tuple[int, ...]] = {}  # operator -> _fresh_returns(operator); schemas never change


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


class StorageTracker(TorchDispatchMode):
    """Counts live bytes per device of the storages created while it is active, with their peak."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Otherwise TorchDispatchMode wraps __torch_dispatch__ in a dynamo-disabling
        # shim: a second Python frame per operator and an import of torch._dynamo.
        return False

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, str, int]] = {}
        self.current: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        fresh = _FRESH.get(func)
        if fresh is None:
            fresh = _FRESH[func] = _fresh_returns(func)
        if fresh:
            if isinstance(out, torch.Tensor):
                self._count(out)
            elif fresh[0] == WHOLE:
                self._count_each(out)
            else:
                for i in fresh:
                    self._count_each(out[i])
        return out

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
        device = str(storage.device)
        if device == "meta":
            return
        nbytes = storage.nbytes()
        self._live[key] = (weakref.ref(storage, partial(self._release, key)), device, nbytes)
        now = self.current.get(device, 0) + nbytes
        self.current[device] = now
        if now > self.peak.get(device, 0):
            self.peak[device] = now

    def _release(self, key: int, _ref: object = None) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current[entry[1]] -= entry[2]

    def restart_peak(self) -> dict[str, int]:
        """The peak per device since the last restart; the next one starts at the current level."""
        peak = dict(self.peak)
        self.peak = dict(self.current)
        return peak

    def forget(self) -> None:
        """Stop tracking: dropping the weak references also drops their callbacks."""
        self._live.clear()


class TrackerMeter:
    """Meter of the ``cpu`` backend; see the module docstring for what it counts."""

    backend = "cpu"
    metrics: tuple[str, ...] = ("allocated", "reserved")

    def __init__(self) -> None:
        self._tracker: StorageTracker | None = None
        self._async_load: str | None = None

    def begin(self) -> Peaks:
        release_failures()
        self._tracker = StorageTracker()
        self._tracker.current["cpu"] = 0
        self._tracker.peak["cpu"] = 0
        self._async_load = os.environ.get(_ASYNC_LOAD)
        os.environ[_ASYNC_LOAD] = "1"
        self._tracker.__enter__()
        return {}

    def mark(self) -> Peaks:
        assert self._tracker is not None, "mark() outside begin()/end()"
        peak = self._tracker.restart_peak()
        # No caching pool on the CPU: what is reserved is what is allocated.
        return {"allocated": peak, "reserved": dict(peak)}

    def end(self) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._tracker.forget()
            self._tracker = None
            if self._async_load is None:
                os.environ.pop(_ASYNC_LOAD, None)
            else:
                os.environ[_ASYNC_LOAD] = self._async_load
