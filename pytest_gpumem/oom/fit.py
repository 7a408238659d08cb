"""The fit search: the largest batch (or sequence) that fits.

:func:`search` halves a knob from a start value until the step fits, then
bisects between the largest value that fitted and the smallest that did not.
It runs inside a test (:func:`fit_in_test`, the ``gpumem.max_fit`` helper,
where the search is the test's purpose) or after a test ran out of memory
(:func:`retry`, the marker's ``retry_on_oom``), where it re-runs the
registered step and the test still fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pytest_gpumem.advise.whatif import make_measure
from pytest_gpumem.core.sample import Fit, largest
from pytest_gpumem.core.units import error_line
from pytest_gpumem.measure.measurement import Measurement, Registration
from pytest_gpumem.measure.meters.base import Meter
from pytest_gpumem.measure.meters.limited import LimitedMeter
from pytest_gpumem.oom.capture import release_cached

RETRY_KNOBS = ("batch", "seq")
"""Knobs the retry search may scale down: a smaller value needs less memory."""


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


def fit_in_test(measurement: Measurement, step: Callable[[int], Any], knob: str, start: int, floor: int) -> Fit:
    """The search as a test's purpose: run ``step(value)`` inside the test, under its device limit, and
    measure each run as a segment of the test (its peak is the test's, what the test holds included).
    After a run that ran out of memory, the gradients it left on the test's registered models are dropped,
    so that the next run starts as a fresh one would."""

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


def retry(
    registration: Registration,
    knob: str,
    limit: int | None,
    create_meter: Callable[[], Meter],
    held: int,
) -> Fit:
    """The search after a test ran out of memory: re-run its registered step with ``knob`` scaled down,
    under the same limit, each run from the state the test left (see :mod:`pytest_gpumem.advise.whatif`).

    ``held`` is what the test still holds (its model), added to each run's own peak so that the peak
    reported is the test's at that value. The test's own value is known not to fit and is not run again.
    """
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
        fit.note = f"the step failed when run again ({error_line(error)})"
        return fit
