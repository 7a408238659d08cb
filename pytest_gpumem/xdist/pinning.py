"""Which GPUs each pytest-xdist worker sees: ``--gpumem-gpus-per-worker N``.

Worker ``gwK`` gets the K-th group of N consecutive GPUs among those the
controller sees (its own ``CUDA_VISIBLE_DEVICES`` honoured), through
``CUDA_VISIBLE_DEVICES`` set in the worker before CUDA initialises there, so
that tests on different workers never share a device. With packing
(``--gpumem-pack``) several workers may share a group: worker K gets group
K mod the number of groups, and the packing scheduler decides what runs
beside what. Pure: no pytest, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

ENV = "CUDA_VISIBLE_DEVICES"


class PinningError(ValueError):
    """The workers cannot each get their own GPUs (more workers than GPU groups, say)."""


def visible_devices(environ: Mapping[str, str], count: int) -> list[str]:
    """The tokens naming the GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` entries: the entries of
    that variable where it is set (indices, UUIDs or MIG names, kept as written), else ``0..count-1``."""
    if ENV in environ:
        return [token.strip() for token in environ[ENV].split(",") if token.strip()][:count]
    return [str(index) for index in range(count)]


def groups(devices: list[str], per_worker: int) -> list[list[str]]:
    """The devices cut into groups of ``per_worker``; GPUs left over are not used."""
    return [devices[start : start + per_worker] for start in range(0, len(devices) - per_worker + 1, per_worker)]


def worker_index(worker_id: str) -> int:
    """``gw3`` -> 3."""
    found = re.fullmatch(r"gw(\d+)", worker_id)
    if found is None:
        raise PinningError(f"cannot tell the index of pytest-xdist worker {worker_id!r}")
    return int(found.group(1))


def assign(devices: list[str], per_worker: int, workers: int, worker: int, shared: bool) -> list[str]:
    """The devices of worker number ``worker`` out of ``workers``. Without ``shared`` (packing) every
    worker needs a group of its own; PinningError says so where there are too few GPUs."""
    found = groups(devices, per_worker)
    if not found:
        raise PinningError(
            f"--gpumem-gpus-per-worker {per_worker}: only {len(devices)} GPU(s) visible ({','.join(devices) or 'none'})"
        )
    if not shared and workers > len(found):
        raise PinningError(
            f"--gpumem-gpus-per-worker {per_worker} with {workers} workers needs {workers * per_worker} GPUs; "
            f"{len(devices)} visible: use -n {len(found)} (or -n auto), or --gpumem-pack to let workers share GPUs"
        )
    return found[worker % len(found)]


def group_for(worker: int, workers: int, count: int, live: list[int]) -> int:
    """The group of worker number ``worker``: ``worker mod count`` for the ``workers`` started with the run;
    one that pytest-xdist started in place of a worker that died (numbered on, past them) takes the group
    with the fewest ``live`` workers (the groups of the workers still running), so pinned workers still
    never share a GPU."""
    if worker < workers:
        return worker % count
    return min(range(count), key=lambda group: (live.count(group), group))
