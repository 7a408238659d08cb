"""A test's second run, made to explain its first: the attribution of the first run's peak taken from it.

On the fast path (see :mod:`pytest_gpumem.measured`) a test is measured by the
allocator's statistics alone; where there is something to explain, its body
runs once more, inside its call phase, with the attribution's tracker and the
advisor's hooks on. That tracker sees what the second run makes. What the test
already held when it began (a model its fixture loaded in the setup, what the
first run left) it did not see made; the first run's tracker would have, so it
is added here: the storages of the models and optimizers the second run
registered or discovered that the tracker did not see made are weights,
gradients and optimizer state, and the rest of what the test held (a batch a
fixture made) counts as activations, as the tracker would have counted it.

The second run's peak, with what the test held when it began, is compared with
the first run's: a deterministic step's allocated peak repeats to the byte,
so a difference says that the attribution describes another run than the
one judged (:class:`~pytest_gpumem.core.sample.Rerun`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch

from pytest_gpumem.core.sample import Attribution, Breakdown, Peaks, Rerun
from pytest_gpumem.measure.introspect import quantization_statistics
from pytest_gpumem.measure.meters.tracker import StorageTracker, block_size


def held(now: dict[str, int], at_start: dict[str, int]) -> dict[str, int]:
    """Bytes per device the test holds (``now``, as a device limit counts them) beyond what was in use when
    its measurement began (``at_start``): what its setup made and the first run left."""
    return {device: n - at_start.get(device, 0) for device, n in now.items() if n - at_start.get(device, 0) > 0}


def untracked(models: Iterable[Any], optimizers: Iterable[Any], tracker: StorageTracker, device: str) -> Breakdown:
    """Bytes on ``device`` of the models' parameters, buffers and quantization statistics (weights), their
    gradients, and the optimizers' state that ``tracker`` did not see made (they were resident before it
    began), each storage once, counted as the tracker counts (the CUDA allocator's blocks)."""
    seen: set[int] = set()
    totals = [0, 0, 0]

    def add(tensor: Any, category: int) -> None:
        if not isinstance(tensor, torch.Tensor) or tracker.tracks(tensor):
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        if storage._cdata in seen or str(storage.device) != device:
            return
        seen.add(storage._cdata)
        nbytes = storage.nbytes()
        totals[category] += block_size(nbytes) if tracker.allocator_blocks and device != "cpu" else nbytes

    for model in models:
        for module in model.modules():
            for param in module.parameters(recurse=False):
                add(param, 0)
                for statistic in quantization_statistics(param, module):
                    add(statistic, 0)
                add(param.grad, 1)
            for buffer in module.buffers(recurse=False):
                add(buffer, 0)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                add(value, 2)
    weights, gradients, optimizer_state = totals
    return Breakdown(weights=weights, gradients=gradients, optimizer=optimizer_state)


def complete(attribution: Attribution | None, device: str, resident: int, known: Breakdown) -> Attribution:
    """The second run's attribution (of its own bytes) with the ``resident`` bytes the test held when it
    began added to the peak and to every stage: as ``known`` splits them, up to ``resident``, the rest as
    activations."""
    left = max(resident, 0)
    parts: dict[str, int] = {}
    for name in ("weights", "gradients", "optimizer"):
        parts[name] = min(getattr(known, name), left)
        left -= parts[name]
    parts["activations"] = left

    def plus(breakdown: Breakdown) -> Breakdown:
        return replace(breakdown, **{name: getattr(breakdown, name) + n for name, n in parts.items()})

    if attribution is None:  # the second run allocated nothing of its own on the device
        attribution = Attribution(peak=Breakdown(), device=device, phase="call")
    return replace(
        attribution, peak=plus(attribution.peak), stages={name: plus(b) for name, b in attribution.stages.items()}
    )


def beside_first(attribution: Attribution, call: Peaks) -> Attribution:
    """The attribution with what lies outside the allocated peak taken from the first run's call phase
    (``call``): what the allocator reserved beyond it, and what the device used beyond that."""
    device = attribution.device
    allocated = (call.get("allocated") or {}).get(device)
    reserved = (call.get("reserved") or {}).get(device)
    used = (call.get("device") or {}).get(device)
    fragmentation = max(0, reserved - allocated) if reserved is not None and allocated is not None else 0
    context = max(0, used - reserved) if used is not None and reserved is not None else 0
    return replace(attribution, fragmentation=fragmentation, context=context)


def compare(first: Peaks, second: Peaks, resident: dict[str, int], device: str, error: str = "") -> Rerun:
    """The second run's call peak of allocated bytes on ``device``, with what the test held when it began,
    beside the first run's (both call phases' peaks, each above what was resident before it)."""
    measured = (first.get("allocated") or {}).get(device, 0)
    peak = resident.get(device, 0) + (second.get("allocated") or {}).get(device, 0)
    return Rerun(device=device, measured=measured, peak=peak, error=error)
