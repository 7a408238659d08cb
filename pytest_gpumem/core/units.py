"""Sizes and tolerances as people write them ("6 GiB", "2%"), as integers inside.

Bytes are integers everywhere in pytest-gpumem; this module is the only edge
where text turns into bytes and back. ``KiB``/``MiB``/``GiB``/``TiB`` are powers
of 2, ``KB``/``MB``/``GB``/``TB`` powers of 10, and output always uses binary
units and says so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# ASCII digits only: \d would also take other scripts' digits, which no one means as a size.
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*%\s*$")
MAX_SIZE = 2**64
"""No memory is this large; a size above it is a typo, and would overflow the float arithmetic of reports."""


class BadValue(ValueError):
    """A value a user wrote that cannot be understood; the message names it and where it came from."""


def parse_size(value: object, where: str) -> int:
    """Bytes from an int or a string such as ``"6 GiB"``, ``"512MiB"``, ``"1.5 GB"`` or ``"4096"``.

    ``where`` names the source (a marker, an option, a file) for the error message.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadValue(f"{where}: expected a size such as '6 GiB' or an int of bytes, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else ""
        if not match or (unit and unit not in _UNITS):
            raise BadValue(
                f"{where}: {value!r} is not a size; write a number and a unit "
                "(B, KiB, MiB, GiB, TiB, KB, MB, GB, TB), e.g. '6 GiB'"
            )
        size = round(Fraction(match.group(1)) * _UNITS[unit or "b"])  # exact: '1.1 GB' is 1100000000 B
    if size < 0:
        raise BadValue(f"{where}: a size cannot be negative, got {value!r}")
    if size > MAX_SIZE:
        raise BadValue(f"{where}: {value!r} is larger than any memory (over 2**64 bytes)")
    return size


@dataclass(frozen=True)
class Tolerance:
    """Allowed growth over a baseline: ``percent`` of it, but never less than ``floor`` bytes."""

    percent: float = 0.0
    floor: int = 0

    def allowed(self, baseline: int) -> int:
        """Bytes a value may exceed ``baseline`` by before it counts as a change."""
        share = baseline * self.percent / 100  # inf for an absurd percentage: allows anything, as it says
        return max(math.floor(min(share, MAX_SIZE)), self.floor)

    def __str__(self) -> str:
        parts = []
        if self.percent or not self.floor:
            parts.append(f"{self.percent:g}%")
        if self.floor:
            parts.append(format_bytes(self.floor))
        return ", ".join(parts)


def parse_tolerance(value: object, where: str) -> Tolerance:
    """A tolerance from ``"2%"``, ``"256 MiB"``, an int of bytes, or both: ``"2%, 1 MiB"``.

    With both, growth is allowed up to the larger of the two, so tiny tests do
    not fail on a few kilobytes while large ones are held to the percentage.
    """
    if isinstance(value, Tolerance):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadValue(f"{where}: expected a tolerance such as '2%' or '256 MiB', got {value!r}")
    if isinstance(value, int):
        return Tolerance(floor=parse_size(value, where))
    if value.strip().startswith("-"):
        raise BadValue(f"{where}: {value!r} is not a tolerance: it cannot be negative; write e.g. '2%' or '256 MiB'")
    percent: float | None = None
    floor: int | None = None
    for part in value.split(","):
        if "%" in part:
            match = _PERCENT.match(part)
            if not match or percent is not None:
                raise BadValue(
                    f"{where}: {value!r} is not a tolerance; write a percentage ('2%'), "
                    "a size ('256 MiB'), or both ('2%, 1 MiB')"
                )
            percent = float(match.group(1))
            if not math.isfinite(percent):
                raise BadValue(f"{where}: {value!r} is not a tolerance; the percentage is too large")
        else:
            if floor is not None:
                raise BadValue(f"{where}: {value!r} has two sizes; write at most one percentage and one size")
            try:
                floor = parse_size(part, where)
            except BadValue:
                raise BadValue(
                    f"{where}: {value!r} is not a tolerance; write a percentage ('2%'), "
                    "a size ('256 MiB'), or both ('2%, 1 MiB')"
                ) from None
    return Tolerance(percent=percent or 0.0, floor=floor or 0)


def format_bytes(n: int | None) -> str:
    """``1.50 GiB``, ``512.00 MiB``, ``123 B``: binary units, two decimals."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        return f"{sign}{abs(n)} B"
    units = ["KiB", "MiB", "GiB", "TiB"]
    value /= 1024
    while round(value, 2) >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{sign}{value:.2f} {units[0]}"


def format_delta(n: int | None) -> str:
    """A signed size: ``+1.50 GiB``, ``-12.0 MiB``, ``+0 B``."""
    if n is None:
        return "-"
    return format_bytes(n) if n < 0 else "+" + format_bytes(n)


def format_percent(delta: int | None, baseline: int | None) -> str:
    """``+3.1%`` of the baseline, or ``-`` where there is none to compare with."""
    if delta is None or not baseline:
        return "-"
    return f"{100 * delta / baseline:+.1f}%"


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


def error_line(error: BaseException) -> str:
    """An error in one line, as a report names it: ``TypeName: the first line of its message``."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
