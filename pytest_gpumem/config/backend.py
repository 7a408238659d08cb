"""Which meter a backend name stands for: ``--gpumem-backend`` resolved, and its meter built.

The meters are imported when built: the cuda meter brings NVML, the estimate meter transformers' fake
tensors, and neither is needed by a run (or a worker) that measures with another.
"""

from __future__ import annotations

from pytest_gpumem.core.gpus import DEFAULT_GPU, find_gpu
from pytest_gpumem.estimate.meter import EstimateMeter
from pytest_gpumem.measure.meters.base import Meter
from pytest_gpumem.measure.meters.cuda import CudaMeter
from pytest_gpumem.measure.meters.tracker import TrackerMeter

BACKENDS = ("auto", "cuda", "cpu", "estimate")


class NoBackend(RuntimeError):
    """The backend asked for cannot measure here (the cuda backend without a visible GPU)."""


def resolve_backend(backend: str) -> str:
    """``auto`` becomes cuda when a GPU is visible, else cpu; NoBackend for cuda without a GPU. The estimate
    backend needs no GPU."""
    if backend in ("cpu", "estimate"):
        return backend
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if backend == "cuda":
        raise NoBackend("no CUDA device is visible (torch.cuda.is_available() is False)")
    return "cpu"


def create(backend: str, attribute: bool = True, gpu: str | None = None, own_process: bool = False) -> Meter:
    """The meter of ``backend``; NoBackend where it cannot measure here. ``attribute``: also keep what
    the attribution needs (a storage tracker, on the cuda backend too). ``gpu``: the GPU the estimate
    backend predicts for (a name or a size; default H100). ``own_process``: the cuda backend's device
    metric counts this process's NVML use only (for workers that share a GPU)."""
    if backend == "estimate":
        return EstimateMeter(find_gpu(gpu or DEFAULT_GPU, "--gpumem-estimate-gpu"), attribute=attribute)
    if resolve_backend(backend) == "cuda":
        return CudaMeter(attribute=attribute, own_process=own_process)

    return TrackerMeter(attribute=attribute)
