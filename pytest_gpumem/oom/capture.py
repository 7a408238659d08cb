"""An out-of-memory failure as a result.

The exception that ended a test (or one it chains) is an out-of-memory
error: CUDA's, or the cpu meter's own
:class:`~pytest_gpumem.measure.meters.tracker.DeviceLimitError` (a subclass of
``torch.OutOfMemoryError``, which ``torch.cuda.OutOfMemoryError`` is, so code
that catches CUDA's error catches it too). :func:`describe` turns it into an
:class:`~pytest_gpumem.core.sample.OutOfMemory`: the request, the device's
allocated and reserved bytes, the limit, and how much more was needed. On
CUDA the request comes from the caching allocator's out-of-memory observer
(exact bytes) where torch has one, else from the error's message.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from pytest_gpumem.core.sample import Attribution, OutOfMemory
from pytest_gpumem.measure.meters.oom_observer import last_observed, parse_cuda_message
from pytest_gpumem.measure.meters.tracker import DeviceLimitError

if TYPE_CHECKING:
    from pytest_gpumem.advise.whatif import Measure
    from pytest_gpumem.measure.attribution import Attributor


def find(error: BaseException | None) -> BaseException | None:
    """The out-of-memory error in ``error`` or in what it chains (``raise ... from``), or None."""
    for link in chain(error):
        if isinstance(link, torch.OutOfMemoryError):
            return link
        if isinstance(link, RuntimeError) and "CUDA out of memory" in str(link):
            return link  # raised as a plain RuntimeError by code that re-wraps CUDA's error
    return None


def chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the exceptions it chains (``raise ... from``, or raised while handling)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def describe(error: BaseException, backend: str, limit: int | None, attribution: Attribution | None) -> OutOfMemory:
    """What the out-of-memory ``error`` says, with the device's bytes at the failure."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, DeviceLimitError):
        return OutOfMemory(
            device=error.device,
            requested=error.requested,
            allocated=dict(error.allocated),
            reserved=dict(error.allocated),  # no caching pool on the cpu backend
            limit=error.limit,
            free=max(0, error.limit - error.allocated.get(error.device, 0)),
            message=message,
            attribution=attribution,
        )
    parsed = parse_cuda_message(str(error))
    observed = last_observed()
    index = observed[0] if observed else parsed["device"]
    requested = observed[1] if observed else parsed["requested"]
    allocated: dict[str, int] = {}
    reserved: dict[str, int] = {}
    if backend == "cuda" and torch.cuda.is_available():
        # Read when the error reached the test's boundary: the frames its traceback holds, and so their
        # tensors, are still alive; what the allocator reserved is as it was at the failure.
        for i in range(torch.cuda.device_count()):
            allocated[f"cuda:{i}"] = torch.cuda.memory_allocated(i)
            reserved[f"cuda:{i}"] = torch.cuda.memory_reserved(i)
        if index is None:
            index = torch.cuda.current_device()
    device = f"cuda:{index}" if index is not None else (attribution.device if attribution else "")
    if limit is not None:
        # The per-process fraction caps the allocator's reserved bytes: a request fails when reserved + request
        # would pass the allowed bytes (the observer's third number while a fraction is set).
        allowed = observed[2] if observed else (parsed["allowed"] or limit)
        free = max(0, allowed - reserved[device]) if device in reserved else None
    else:
        free = observed[3] if observed else parsed["free"]
    return OutOfMemory(
        device=device,
        requested=requested,
        allocated=allocated,
        reserved=reserved,
        limit=limit,
        free=free,
        message=message,
        attribution=attribution,
    )


def capture(error: BaseException, backend: str, limit: int | None, attributor: Attributor | None) -> OutOfMemory | None:
    """The :class:`OutOfMemory` of the exception that ended a test, or None if it is not one. The
    attribution is taken at the moment the allocation failed, from the tracker's records."""
    found = find(error)
    if found is None:
        return None
    attribution = None
    if attributor is not None:
        tracker = attributor.tracker
        if isinstance(found, DeviceLimitError):
            moment: tuple[str, int, tuple[str, str, Any]] | None = (found.device, found.seq, found.where)
        elif tracker.last_oom is not None:
            seq, where = tracker.last_oom
            observed = last_observed()
            index = observed[0] if observed else parse_cuda_message(str(found))["device"]
            device = f"cuda:{index}" if index is not None else _busiest(tracker.current)
            moment = (device, seq, where) if device else None
        else:
            moment = None
        if moment is not None:
            attribution = attributor.at(*moment)
    return describe(found, backend, limit, attribution)


def _busiest(current: dict[str, int]) -> str:
    return max(current, key=lambda device: current[device]) if current else ""


def demand(oom: OutOfMemory) -> Attribution | None:
    """The attribution at the failure with the failed request added to the activations: the peak the test
    asked for, which the advisor's levers act on."""
    if oom.attribution is None:
        return None
    peak = replace(oom.attribution.peak, activations=oom.attribution.peak.activations + (oom.requested or 0))
    return replace(oom.attribution, peak=peak)


def remembering(measure: Measure) -> Measure:
    """``measure`` that runs the unchanged step (no overrides) once and remembers its peak: it repeats to the
    byte, and both the overshoot and the advisor's reference ask for it."""
    reference: list[int] = []

    def remembered(overrides: dict[str, Any], *, gradients_alive: bool = False) -> int:
        if overrides or gradients_alive:
            return measure(overrides, gradients_alive=gradients_alive)
        if not reference:
            reference.append(measure(overrides))
        return reference[0]

    return remembered


def overshoot(failure: OutOfMemory, measure: Measure, in_use: int) -> int | None:
    """Bytes the whole step needs beyond the limit: what is in use on the failing device (the test's model,
    earlier tests' leftovers) plus the step's peak when run again without the limit, minus the limit. None
    without a limit, or where the step fails when run again."""
    if failure.limit is None:
        return None
    try:
        peak = measure({})
    except Exception:  # noqa: BLE001 - the user's step: the request's shortfall then stands alone
        return None
    return max(0, in_use + peak - failure.limit)


def release_cached() -> None:
    """Collect garbage and give the CUDA allocator's cached blocks back, after a run that ran out of memory."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def drop_frames(error: BaseException | None) -> None:
    """Free what the frames of ``error``'s tracebacks (and its chain's) hold: the failed step's tensors.

    Call it once the failure has been rendered. Every frame's locals are
    cleared and the tracebacks are unlinked, so the frames themselves go: a
    frame also holds its function, whose closure cells (the arguments of a
    module's call, say) keep tensors that clearing locals does not reach.
    """
    for link in chain(error):
        tb = link.__traceback__
        while tb is not None:
            frame, following = tb.tb_frame, tb.tb_next
            try:
                frame.clear()
                if sys.version_info < (3, 13):
                    # Until 3.13 a frame keeps a snapshot dict of its locals once anything asked for them
                    # (pytest's rendering does), and clear() leaves it: asking again syncs it.
                    frame.f_locals  # noqa: B018
            except RuntimeError:
                pass  # a frame still running keeps its locals
            tb.tb_next = None
            tb = following
