"""The CUDA caching allocator's out-of-memory observer: the exact bytes of a failed request.

The allocator calls the observer inside the failed allocation; where torch has none, the error's message
is parsed instead. Nothing here imports torch until a CUDA meter starts watching.
"""

from __future__ import annotations

import re

from pytest_gpumem.core.units import parse_size

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


def last_observed() -> tuple[int, int, int, int] | None:
    """The allocator's last report: (device index, requested, allowed, free) bytes; None where none came."""
    return _observed[0] if _observed else None
