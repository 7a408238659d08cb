"""This machine's fingerprint: the hardware key its measurements are filed under and the versions of the
libraries that change memory use (see :mod:`pytest_gpumem.core.environment`)."""

from __future__ import annotations

from importlib import metadata

import torch

from pytest_gpumem.core.environment import SOFTWARE, device_key
from pytest_gpumem.core.gpus import DEFAULT_GPU, find_gpu


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
