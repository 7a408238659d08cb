"""The ``gpumem`` marker: its signature, its help text, and its parsing into a Spec."""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping
from typing import Any

from pytest_gpumem.core.sample import METRICS, Spec, device_order
from pytest_gpumem.core.units import BadValue, Tolerance, parse_device_limit, parse_leak, parse_size, parse_tolerance
from pytest_gpumem.oom.fit import RETRY_KNOBS


def gpumem(
    budget: int | str | None = None,
    tolerance: int | str | None = None,
    metric: str = "allocated",
    *,
    device_limit: int | str | None = None,
    leak: int | str | bool | None = None,
    retry_on_oom: str | None = None,
    budget_per_device: Mapping[str | int, int | str] | None = None,
    exclusive: bool = False,
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
    budget_per_device: a ceiling per device, {"cuda:1": "20 GiB", "rank0:cuda:0": "8 GiB"} (an int key n
    means cuda:n); budget still holds for the largest device. Baselines are compared device by device.
    exclusive: under VRAM-aware packing, run this test alone on its device.
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
    bound = _bind(args, kwargs, where)
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
    exclusive = bound.arguments["exclusive"]
    if not isinstance(exclusive, bool):
        raise BadValue(f"{where}: exclusive: expected True or False, got {exclusive!r}")
    return Spec(
        metric=metric,
        budget=None if budget is None else parse_size(budget, f"{where}: budget"),
        tolerance=default_tolerance if tolerance is None else parse_tolerance(tolerance, f"{where}: tolerance"),
        device_limit=default_device_limit
        if device_limit is None
        else parse_device_limit(device_limit, f"{where}: device_limit"),
        leak=default_leak if leak is None else parse_leak(leak, f"{where}: leak"),
        retry_on_oom=retry,
        budget_per_device=parse_budget_per_device(bound.arguments["budget_per_device"], where),
        exclusive=exclusive,
    )


def _bind(args: tuple[Any, ...], kwargs: Mapping[str, Any], where: str) -> inspect.BoundArguments:
    """The marker's arguments bound to :func:`gpumem`'s signature, defaults applied; BadValue in one line for
    a misspelt keyword (with the closest name), too many positional arguments, or one given twice."""
    names = list(_SIGNATURE.parameters)
    for name in kwargs:
        if name not in _SIGNATURE.parameters:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the keywords are {', '.join(names)}"
            raise BadValue(f"{where}: unknown keyword {name!r}; {hint}")
    positional = [p.name for p in _SIGNATURE.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    if len(args) > len(positional):
        raise BadValue(
            f"{where}: {len(args)} positional arguments {args!r}; it takes at most {len(positional)} "
            f"({', '.join(positional)}), the rest by keyword"
        )
    for name in positional[: len(args)]:
        if name in kwargs:
            raise BadValue(f"{where}: {name} is given twice, by position and by keyword")
    bound = _SIGNATURE.bind(*args, **kwargs)  # cannot fail now: every way it could is checked above
    bound.apply_defaults()
    return bound


_DEVICE = re.compile(r"(rank[0-9]+:)?(cpu|[a-z]+:[0-9]+)")
"""Device names as the meters write them: ``cpu``, ``cuda:1``, and per rank ``rank0:cuda:0``."""


def device_name(key: object, where: str) -> str:
    """``cuda:1`` from ``1`` or ``"cuda:1"``; BadValue for anything the meters never name, so that a
    misspelt device is an error rather than a budget that never applies."""
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return f"cuda:{key}"
    if isinstance(key, str) and _DEVICE.fullmatch(key):
        return key
    raise BadValue(f"{where}: {key!r} is not a device; write 'cuda:1', 'cpu', 'rank0:cuda:0', or an int n for cuda:n")


def parse_budget_per_device(value: object, where: str) -> tuple[tuple[str, int], ...]:
    """Spec's ``budget_per_device`` from the marker's mapping: device names and sizes in bytes, sorted."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise BadValue(f"{where}: budget_per_device: expected a mapping such as {{'cuda:1': '20 GiB'}}, got {value!r}")
    budgets: dict[str, int] = {}
    for key, size in value.items():
        device = device_name(key, f"{where}: budget_per_device")
        if device in budgets:
            raise BadValue(f"{where}: budget_per_device: {device} is given twice ({key!r})")
        budgets[device] = parse_size(size, f"{where}: budget_per_device[{key!r}]")
    return tuple(sorted(budgets.items(), key=lambda item: device_order(item[0])))
