"""The fingerprint a measurement is filed under: hardware key and software versions (read from the
machine by :mod:`pytest_gpumem.measure.machine`).

Baselines are keyed by hardware alone (the GPU model and memory, or ``cpu``):
a different runner is a different key. Software is recorded with each
baseline and compared, never used as a key, because library upgrades are
where memory regressions come from.
"""

from __future__ import annotations

import re

SOFTWARE = ("torch", "cuda", "transformers", "peft", "bitsandbytes", "accelerate")


def software_changes(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """``["transformers 4.57.6 -> 5.0.0"]``: each library whose version differs, in SOFTWARE order."""
    names = [n for n in SOFTWARE if n in before or n in now]
    names += sorted((set(before) | set(now)) - set(SOFTWARE))
    return [
        f"{name} {before.get(name, 'absent')} -> {now.get(name, 'absent')}"
        for name in names
        if before.get(name) != now.get(name)
    ]


def device_key(name: str, total_memory: int) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``NVIDIA-H100-80GB-HBM3``; memory is appended when the name lacks it."""
    key = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")
    if not re.search(r"\d+GB", key):
        key += f"-{round(total_memory / 2**30)}GiB"
    return key
