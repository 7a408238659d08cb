"""The ``gpumem`` marker: its signature, its help text, and its parsing into a Spec."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .oom import RETRY_KNOBS, parse_device_limit, parse_leak
from .sample import METRICS, Spec
from .units import BadValue, Tolerance, parse_size, parse_tolerance


def gpumem(
    budget: int | str | None = None,
    tolerance: int | str | None = None,
    metric: str = "allocated",
    *,
    device_limit: int | str | None = None,
    leak: int | str | bool | None = None,
    retry_on_oom: str | None = None,
) -> None:
    """Measure this test's peak memory and hold it to a budget and its stored baseline.

    budget: a ceiling on the peak ("6 GiB", "512MiB", "1.5 GB" or int bytes); over it, the test fails.
    tolerance: allowed growth over the stored baseline ("2%", "256 MiB", or "2%, 1 MiB": the larger);
    default: --gpumem-tolerance. metric: allocated (allocator peak), reserved (allocator reserved peak)
    or device (NVML device use, cuda backend only).
    device_limit: run the test on each device capped at this size ("16 GiB"), as on a smaller GPU;
    default: --gpumem-device-limit. leak: what the test may leave alive after its teardown (a size, a
    percentage of its peak, or both); more errors the test; False: no check; default: --gpumem-leak,
    else leftovers over 1 MiB are flagged without failing. retry_on_oom: batch or seq: after an
    out-of-memory error, search that knob of the registered training step down for the largest value
    that fits and report it (the test still fails).
    """


_SIGNATURE = inspect.signature(gpumem)
MARKER_HELP = (
    f"gpumem{_SIGNATURE}".replace("'", "")
    + ": "
    + " ".join(line.strip() for line in (gpumem.__doc__ or "").strip().splitlines())
)


def parse_marker(
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    default_tolerance: Tolerance,
    metrics: tuple[str, ...],
    backend: str,
    where: str,
    default_device_limit: int | None = None,
    default_leak: Tolerance | bool | None = None,
) -> Spec:
    """The Spec of a marker's arguments; BadValue names the bad one and ``where`` it is.

    ``metrics`` are those the active backend measures, so that asking for
    ``device`` on the cpu backend is an error, not a silent zero. The
    ``default_*`` values are the run's settings, used where the marker sets none.
    """
    try:
        bound = _SIGNATURE.bind(*args, **kwargs)
    except TypeError as exc:
        raise BadValue(f"{where}: {exc} (signature: gpumem{_SIGNATURE})") from None
    bound.apply_defaults()
    budget, tolerance, metric = (bound.arguments[name] for name in ("budget", "tolerance", "metric"))
    device_limit, leak, retry = (bound.arguments[name] for name in ("device_limit", "leak", "retry_on_oom"))
    if metric not in METRICS:
        raise BadValue(f"{where}: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric not in metrics:
        raise BadValue(
            f"{where}: metric {metric!r} is not measured by the {backend} backend (it measures {', '.join(metrics)})"
        )
    if retry is not None and retry not in RETRY_KNOBS:
        raise BadValue(f"{where}: retry_on_oom: unknown knob {retry!r}; choose one of {', '.join(RETRY_KNOBS)}")
    return Spec(
        metric=metric,
        budget=None if budget is None else parse_size(budget, f"{where}: budget"),
        tolerance=default_tolerance if tolerance is None else parse_tolerance(tolerance, f"{where}: tolerance"),
        device_limit=default_device_limit
        if device_limit is None
        else parse_device_limit(device_limit, f"{where}: device_limit"),
        leak=default_leak if leak is None else parse_leak(leak, f"{where}: leak"),
        retry_on_oom=retry,
    )
