"""Meters: one protocol, one module per backend.

A meter measures one test at a time. ``begin`` cleans up, resets the peak
statistics and returns what is resident (absolute bytes); each ``mark`` returns
the peaks *above that* since the previous mark and starts a new segment, so the
caller can assign segments to phases; ``end`` stops measuring.

Some capabilities are optional (:class:`Guard`): ``set_limit`` caps every
device (a smaller GPU simulated), ``leftover`` says what the last test left
allocated after its teardown, and ``in_use`` what is allocated now, as a
limit counts it. The cpu and cuda meters have them.
"""

from __future__ import annotations

import gc
import sys
from typing import Protocol, runtime_checkable

from ..sample import Peaks

BACKENDS = ("auto", "cuda", "cpu", "estimate")


class Meter(Protocol):
    backend: str
    metrics: tuple[str, ...]

    def begin(self) -> Peaks: ...

    def mark(self) -> Peaks: ...

    def end(self) -> None: ...


@runtime_checkable
class Guard(Protocol):
    """What a meter needs to enforce a device limit and to find leaks."""

    def set_limit(self, limit: int | None) -> None: ...

    def leftover(self) -> dict[str, int]: ...

    def in_use(self) -> dict[str, int]: ...


def guard(meter: object) -> Guard | None:
    """``meter`` as a :class:`Guard`, or None where it cannot limit a device or tell leftovers."""
    return meter if isinstance(meter, Guard) else None


_frozen = False
_collected = False  # a full collection ran after the last test's teardown, and nothing failed since
_FAILURE = ("last_type", "last_value", "last_traceback", "last_exc")


def release_failures() -> None:
    """Drop what pytest and the interpreter keep of the last failure, then collect all garbage.

    A failed test's traceback holds its frames and so its tensors; left alive,
    they would be charged to whatever is measured next. A full collection also
    restarts the collector's counters, so that when cyclic garbage is freed
    during the test does not depend on the tests before it. The first call
    freezes what is alive then (modules, mostly), so later collections scan
    only what tests created. Where :func:`collect_after_teardown` already
    collected after the last test and nothing failed since, the collection is
    not repeated: it would find nothing, and it is the dearest part of a test's
    overhead.
    """
    global _frozen, _collected
    failed = False
    for name in _FAILURE:
        if getattr(sys, name, None) is not None:
            failed = True
            setattr(sys, name, None)
    if failed or not _collected:
        gc.collect()
    _collected = False
    if not _frozen:
        gc.freeze()
        _frozen = True


def collect_after_teardown() -> None:
    """:func:`release_failures` after a test's teardown (to measure what it left alive); the next test's
    begin then need not collect again."""
    global _collected
    release_failures()
    _collected = True


class NoBackend(RuntimeError):
    """The backend asked for cannot measure here (the cuda backend without a visible GPU)."""


def resolve_backend(backend: str) -> str:
    """``auto`` becomes cuda when a GPU is visible, else cpu; NoBackend for cuda without a GPU. The estimate
    backend needs no GPU."""
    if backend in ("cpu", "estimate"):
        return backend
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if backend == "cuda":
        raise NoBackend("no CUDA device is visible (torch.cuda.is_available() is False)")
    return "cpu"


def create(backend: str, attribute: bool = True, gpu: str | None = None, own_process: bool = False) -> Meter:
    """The meter of ``backend``; NoBackend where it cannot measure here. ``attribute``: also keep what
    the attribution needs (a storage tracker, on the cuda backend too). ``gpu``: the GPU the estimate
    backend predicts for (a name or a size; default H100). ``own_process``: the cuda backend's device
    metric counts this process's NVML use only (for workers that share a GPU)."""
    if backend == "estimate":
        from ..gpus import DEFAULT_GPU, find_gpu
        from .estimate import EstimateMeter

        return EstimateMeter(find_gpu(gpu or DEFAULT_GPU, "--gpumem-estimate-gpu"), attribute=attribute)
    if resolve_backend(backend) == "cuda":
        from .cuda import CudaMeter

        return CudaMeter(attribute=attribute, own_process=own_process)
    from .tracker import TrackerMeter

    return TrackerMeter(attribute=attribute)
