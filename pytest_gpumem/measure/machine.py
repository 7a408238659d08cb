"""This machine's fingerprint: the hardware key its measurements are filed under and the versions of the
libraries that change memory use (see :mod:`pytest_gpumem.core.environment`)."""

from __future__ import annotations

from importlib import metadata

import torch

from pytest_gpumem.core.environment import SOFTWARE, device_key
from pytest_gpumem.core.gpus import DEFAULT_GPU, Gpu, device_gpu, find_gpu


def software_versions() -> dict[str, str]:
    """Versions of the libraries that change memory use; absent ones are left out."""
    versions: dict[str, str] = {"torch": str(torch.__version__)}
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    for name in SOFTWARE[2:]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def hardware_key(backend: str, gpu: str | None = None) -> str:
    """The run's hardware key: ``cpu``, the GPU model, or ``estimate:<gpu>`` for predictions of ``gpu``
    (so that predictions are compared with predictions). Several GPUs of one model share one key; a mix
    of models joins them with ``+``."""
    if backend == "estimate":
        return "estimate:" + find_gpu(gpu or DEFAULT_GPU, "--gpumem-estimate-gpu").key
    if backend != "cuda":
        return "cpu"
    props = [torch.cuda.get_device_properties(index) for index in range(torch.cuda.device_count())]
    return "+".join(sorted({device_key(p.name, p.total_memory) for p in props}))


def replay_gpu(backend: str, estimate_gpu: str | None) -> Gpu:
    """The GPU a test's own model is replayed as: this machine's where the catalogue knows it (else one of
    its memory), the estimate backend's, or the catalogue's default on the cpu backend."""
    if backend == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return device_gpu(props.name, props.total_memory)
    return find_gpu(estimate_gpu or DEFAULT_GPU, "--gpumem-estimate-gpu")


def visible_gpus(backend: str) -> int:
    """The GPUs a test can spread a model over: the CUDA devices visible to this process (a pinned worker's
    own), one for the estimate backend's GPU, none on the cpu backend."""
    if backend == "cuda":
        return torch.cuda.device_count()
    return 1 if backend == "estimate" else 0
