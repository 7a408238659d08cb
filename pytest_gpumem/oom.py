"""Out of memory as a result: capturing the failure, checking what a test left behind, and the fit search.

- **Capture.** The exception that ended a test (or one it chains) is an
  out-of-memory error: CUDA's, or the cpu meter's own
  :class:`~pytest_gpumem.meters.tracker.DeviceLimitError` (a subclass of
  ``torch.OutOfMemoryError``, which ``torch.cuda.OutOfMemoryError`` is, so code
  that catches CUDA's error catches it too). :func:`describe` turns it into an
  :class:`~pytest_gpumem.sample.OutOfMemory`: the request, the device's
  allocated and reserved bytes, the limit, and how much more was needed. On
  CUDA the request comes from the caching allocator's out-of-memory observer
  (exact bytes) where torch has one, else from the error's message.
- **Leftovers.** :func:`check_leak` judges what a test left alive after its
  teardown against a tolerance; by default it is only flagged.
- **Fit search.** :func:`search` halves a knob from a start value until the
  step fits, then bisects between the largest value that fitted and the
  smallest that did not. It runs inside a test (:func:`fit_in_test`, the
  ``gpumem.max_fit`` helper, where the search is the test's purpose) or after
  a test ran out of memory (:func:`retry`, the marker's ``retry_on_oom``),
  where it re-runs the registered step and the test still fails.

torch is imported only where a function needs it, so that the marker can be
parsed without it.
"""

from __future__ import annotations

import gc
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import meters
from .sample import Attribution, Fit, Leak, OutOfMemory, Peaks, largest
from .units import BadValue, Tolerance, parse_size, parse_tolerance

if TYPE_CHECKING:
    from .attribution import Attributor
    from .measurement import Measurement, Registration
    from .meters import Meter
    from .whatif import Measure

RETRY_KNOBS = ("batch", "seq")
"""Knobs the retry search may scale down: a smaller value needs less memory."""

_OFF = {"off", "false", "no", "0"}


def parse_device_limit(value: object, where: str) -> int:
    """A device limit in bytes from a size (``"16 GiB"``); BadValue naming ``where`` for anything else or 0."""
    limit = parse_size(value, where)
    if limit <= 0:
        raise BadValue(f"{where}: a device limit must be more than 0 bytes, got {value!r}")
    return limit


def parse_leak(value: object, where: str) -> Tolerance | bool:
    """A leak limit: a tolerance (``"1 MiB"``, ``"1%"`` of the test's peak, or both), or False (``False``,
    ``"off"``) for no check."""
    if value is False or (isinstance(value, str) and value.strip().lower() in _OFF):
        return False
    if value is True:
        raise BadValue(f"{where}: expected a tolerance such as '1 MiB' or '1%, 1 MiB', or False for no check; got True")
    return parse_tolerance(value, where)


# -- capture


def find(error: BaseException | None) -> BaseException | None:
    """The out-of-memory error in ``error`` or in what it chains (``raise ... from``), or None."""
    import torch

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


_UNIT = r"(\d+(?:\.\d+)?) (bytes|KiB|MiB|GiB|TiB)"
_REQUEST = re.compile(r"[Oo]ut of memory\. Tried to allocate " + _UNIT)
_DEVICE = re.compile(r"GPU (\d+) has a total capac")
_FREE = re.compile(r"of which " + _UNIT + " is free")
_ALLOWED = re.compile(_UNIT + " allowed;")


def _size(match: re.Match[str] | None) -> int | None:
    if match is None:
        return None
    number, unit = match.group(1), match.group(2)
    return round(float(number)) if unit == "bytes" else parse_size(f"{number} {unit}", "CUDA's message")


def parse_cuda_message(text: str) -> dict[str, int | None]:
    """The numbers of a CUDA out-of-memory message: ``requested``, ``device`` (index), ``free`` and
    ``allowed`` (with a memory fraction set); each None where the message lacks it. Sizes in the message
    are rounded to two decimals of their unit."""
    device = _DEVICE.search(text)
    return {
        "requested": _size(_REQUEST.search(text)),
        "device": int(device.group(1)) if device else None,
        "free": _size(_FREE.search(text)),
        "allowed": _size(_ALLOWED.search(text)),
    }


_observed: list[tuple[int, int, int, int]] = []
_watching = False


def _observe(device: int, requested: int, allowed: int, free: int) -> None:
    # Called by the caching allocator, inside the failed allocation: an error here would replace
    # CUDA's own, so nothing is done but keeping the numbers.
    try:
        _observed[:] = [(int(device), int(requested), int(allowed), int(free))]
    except BaseException:  # noqa: BLE001 - see above
        pass


def watch_cuda() -> None:
    """Have the CUDA caching allocator report its out-of-memory errors (once a process; it keeps observers
    for the life of the process). Where torch has no observer, the error's message is parsed instead."""
    global _watching
    if _watching:
        return
    import torch

    attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
    if attach is not None:
        attach(_observe)
    _watching = True


def forget_observed() -> None:
    """Drop the allocator's last report, so that an error caught in an earlier test is not read as this one's."""
    _observed.clear()


def describe(error: BaseException, backend: str, limit: int | None, attribution: Attribution | None) -> OutOfMemory:
    """What the out-of-memory ``error`` says, with the device's bytes at the failure."""
    from .meters.tracker import DeviceLimitError

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
    import torch

    parsed = parse_cuda_message(str(error))
    observed = _observed[0] if _observed else None
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
    from .meters.tracker import DeviceLimitError

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
            observed = _observed[0] if _observed else None
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


# -- what a test left behind


def check_leak(devices: dict[str, int], policy: Tolerance | bool | None, peak: int, flag: Tolerance) -> Leak | None:
    """Judge ``devices`` (bytes per device a test left alive after its teardown) against ``policy``: a
    Tolerance is a limit (going over it fails; a percentage is of the test's ``peak``), None flags leftovers
    above ``flag`` without failing, False checks nothing."""
    if policy is False:
        return None
    tolerance = policy if isinstance(policy, Tolerance) else flag
    return Leak(
        bytes=max(devices.values(), default=0),
        devices={device: n for device, n in sorted(devices.items()) if n > 0},
        allowed=tolerance.allowed(peak),
        enforced=isinstance(policy, Tolerance),
    )


# -- the fit search


def search(
    run: Callable[[int], int | None],
    knob: str,
    start: int,
    floor: int = 1,
    *,
    start_fails: bool = False,
    limit: int | None = None,
    purpose: bool = False,
) -> Fit:
    """The largest value from ``floor`` to ``start`` for which ``run(value)`` fits.

    ``run`` returns the peak at a value, or None where it ran out of memory.
    Values are halved from ``start`` until one fits, then bisected between it
    and the smallest that did not, so the answer takes about twice log2(start)
    runs. ``start_fails``: ``start`` is known not to fit (the test ran out of
    memory with it), and is not run again.
    """
    fit = Fit(knob=knob, start=start, floor=floor, limit=limit, purpose=purpose)

    def attempt(value: int) -> int | None:
        peak = run(value)
        fit.tried.append((value, peak))
        return peak

    bad: int | None = start if start_fails else None
    value = max(floor, start // 2) if start_fails else start
    if start_fails and start <= floor:
        return fit
    peak = attempt(value)
    while peak is None:
        bad = value
        if value <= floor:
            return fit  # not even the floor fits
        value = max(floor, value // 2)
        peak = attempt(value)
    good = value
    fit.value, fit.peak = value, peak
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        peak = attempt(middle)
        if peak is None:
            bad = middle
        else:
            good = middle
            fit.value, fit.peak = middle, peak
    return fit


def release_cached() -> None:
    """Collect garbage and give the CUDA allocator's cached blocks back, after a run that ran out of memory."""
    gc.collect()
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def fit_in_test(measurement: Measurement, step: Callable[[int], Any], knob: str, start: int, floor: int) -> Fit:
    """The search as a test's purpose: run ``step(value)`` inside the test, under its device limit, and
    measure each run as a segment of the test (its peak is the test's, what the test holds included).
    After a run that ran out of memory, the gradients it left on the test's registered models are dropped,
    so that the next run starts as a fresh one would."""
    import torch

    def run(value: int) -> int | None:
        failed = False
        with measurement.span() as peaks:
            try:
                step(value)
            except torch.OutOfMemoryError:
                failed = True
        if failed:
            for model in measurement.registration.models:
                model.zero_grad(set_to_none=True)
            release_cached()  # out of the except block, the failed run's frames and tensors are gone
            return None
        return largest(peaks, "allocated") or 0

    return search(run, knob, start, floor, limit=measurement.limit, purpose=True)


class LimitedMeter:
    """A meter that puts a device limit in force from ``begin`` to ``end`` (for the retry's re-runs)."""

    def __init__(self, meter: Meter, limit: int | None) -> None:
        self._meter = meter
        self._limit = limit
        self.backend = meter.backend
        self.metrics = meter.metrics

    def _set(self, limit: int | None) -> None:
        guard = meters.guard(self._meter)
        if guard is None:
            raise ValueError(f"the {self.backend} backend cannot enforce a device limit")
        guard.set_limit(limit)

    def begin(self) -> Peaks:
        if self._limit is not None:
            self._set(self._limit)
        return self._meter.begin()

    def mark(self) -> Peaks:
        return self._meter.mark()

    def end(self) -> None:
        try:
            self._meter.end()
        finally:
            if self._limit is not None:
                self._set(None)


def retry(
    registration: Registration,
    knob: str,
    limit: int | None,
    create_meter: Callable[[], Meter],
    held: int,
) -> Fit:
    """The search after a test ran out of memory: re-run its registered step with ``knob`` scaled down,
    under the same limit, each run from the state the test left (see :mod:`pytest_gpumem.whatif`).

    ``held`` is what the test still holds (its model), added to each run's own peak so that the peak
    reported is the test's at that value. The test's own value is known not to fit and is not run again.
    """
    import torch

    from .whatif import make_measure

    start = registration.knobs.get(knob)
    fit = Fit(knob=knob, start=start if isinstance(start, int) else 0, limit=limit)
    if not isinstance(start, int) or isinstance(start, bool) or start < 1:
        fit.note = (
            f"the test registered no {knob} to scale: use the train_step fixture, "
            f"or gpumem.register(step=..., {knob}=...)"
        )
        return fit
    if registration.models_freed:
        fit.note = "the test freed its model, so its step cannot run again"
        return fit
    measure = make_measure(registration, lambda: LimitedMeter(create_meter(), limit))
    if measure is None:
        fit.note = f"the test registered no step to run again with a smaller {knob}: use the train_step fixture"
        return fit

    def run(value: int) -> int | None:
        try:
            return held + measure({knob: value})
        except torch.OutOfMemoryError:
            return None

    try:
        return search(run, knob, start, start_fails=True, limit=limit)
    except Exception as error:  # noqa: BLE001 - the user's step failed otherwise: say so, the test fails anyway
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        fit.note = f"the step failed when run again ({type(error).__name__}: {text})"
        return fit


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
