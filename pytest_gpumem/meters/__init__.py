"""Meters: one protocol, one module per backend.

A meter measures one test at a time. ``begin`` cleans up, resets the peak
statistics and returns what is resident (absolute bytes); each ``mark`` returns
the peaks *above that* since the previous mark and starts a new segment, so the
caller can assign segments to phases; ``end`` stops measuring.
"""

from __future__ import annotations

import gc
import sys
from typing import Protocol

from ..sample import Peaks

BACKENDS = ("auto", "cuda", "cpu")


class Meter(Protocol):
    backend: str
    metrics: tuple[str, ...]

    def begin(self) -> Peaks: ...

    def mark(self) -> Peaks: ...

    def end(self) -> None: ...


_frozen = False


def release_failures() -> None:
    """Drop what pytest and the interpreter keep of the last failure, then collect all garbage.

    A failed test's traceback holds its frames and so its tensors; left alive,
    they would be charged to whatever is measured next. A full collection also
    restarts the collector's counters, so that when cyclic garbage is freed
    during the test does not depend on the tests before it. The first call
    freezes what is alive then (modules, mostly), so later collections scan
    only what tests created.
    """
    global _frozen
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    gc.collect()
    if not _frozen:
        gc.freeze()
        _frozen = True


class NoBackend(RuntimeError):
    """The backend asked for cannot measure here (the cuda backend without a visible GPU)."""


def resolve_backend(backend: str) -> str:
    """``auto`` becomes cuda when a GPU is visible, else cpu; NoBackend for cuda without a GPU."""
    if backend == "cpu":
        return backend
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if backend == "cuda":
        raise NoBackend("no CUDA device is visible (torch.cuda.is_available() is False)")
    return "cpu"


def create(backend: str, attribute: bool = True) -> Meter:
    """The meter of ``backend``; NoBackend where it cannot measure here. ``attribute``: also keep what
    the attribution needs (a storage tracker, on the cuda backend too)."""
    if resolve_backend(backend) == "cuda":
        from .cuda import CudaMeter

        return CudaMeter(attribute=attribute)
    from .tracker import TrackerMeter

    return TrackerMeter(attribute=attribute)
