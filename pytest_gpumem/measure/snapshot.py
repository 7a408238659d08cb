"""Memory snapshots that open in PyTorch's memory visualizer (https://pytorch.org/memory_viz).

On the cuda backend they are the allocator's own (``torch.cuda.memory._snapshot``
with history recorded during the test). On the cpu backend the tracker's
records are written in the same format: an ``alloc`` event when a storage was
made and ``free_requested``/``free_completed`` when it died, in the order they
happened, each storage at an address of its own and labelled with its
consumer (weights, gradients, optimizer, activations) as its stack frame, so
that the visualizer's timeline shows what the cpu backend counted.
"""

from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path
from typing import Any

from pytest_gpumem.core.atomic import write_atomic
from pytest_gpumem.core.sample import CONSUMERS

_MAX_EVENTS = 1_000_000  # per device; what the allocator keeps of a long test's history


def from_records(records: list[list[Any]]) -> dict[str, Any]:
    """A snapshot of tracker records (``[nbytes, device, made, freed, category, in_layer]``), one trace
    per device in order of first use."""
    devices: list[str] = []
    events: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
    address = 0x10000
    for nbytes, device, made, freed, category, in_layer in records:
        if device not in events:
            devices.append(device)
            events[device] = []
        label = CONSUMERS[category] + (" (in a decoder layer)" if in_layer else "")
        frames = [{"filename": "pytest-gpumem", "line": 0, "name": label}]
        base = {"addr": address, "size": nbytes, "stream": 0, "frames": frames}
        events[device].append((made, 0, {**base, "action": "alloc", "time_us": made}))
        if freed != float("inf"):
            events[device].append((int(freed), 1, {**base, "action": "free_requested", "time_us": int(freed)}))
            events[device].append((int(freed), 2, {**base, "action": "free_completed", "time_us": int(freed)}))
        address += max(nbytes, 1) + 0x100
    traces = [[event for _, _, event in sorted(events[d], key=lambda e: (e[0], e[1]))] for d in devices]
    return {"segments": [], "device_traces": traces, "devices": devices}


def start_cuda_history() -> None:
    """Record the CUDA allocator's history (with Python stacks) from now on, forgetting what was recorded."""
    import torch

    record = torch.cuda.memory._record_memory_history
    record(enabled=None)
    kwargs: dict[str, Any] = {"context": "all", "stacks": "python", "max_entries": _MAX_EVENTS}
    if "clear_history" in inspect.signature(record).parameters:
        kwargs["clear_history"] = True
    record(enabled="all", **kwargs)


def stop_cuda_history() -> None:
    import torch

    torch.cuda.memory._record_memory_history(enabled=None)


def cuda_snapshot() -> dict[str, Any]:
    """The CUDA allocator's snapshot: its segments and the history recorded since :func:`start_cuda_history`."""
    import torch

    return torch.cuda.memory._snapshot()


def file_name(nodeid: str) -> str:
    """A file name for a test's snapshot: its node id with every character unsafe in a path replaced."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid).strip("_") + ".pickle"


def write(snapshot: dict[str, Any], directory: Path, nodeid: str) -> Path:
    """Write ``snapshot`` as ``directory/<test>.pickle`` (atomically) and return its path."""

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file_name(nodeid)
    write_atomic(path, pickle.dumps(snapshot))
    return path
