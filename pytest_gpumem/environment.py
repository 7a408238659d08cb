"""The fingerprint a measurement is filed under: hardware key and software versions.

Baselines are keyed by hardware alone (the GPU model and memory, or ``cpu``):
a different runner is a different key. Software is recorded with each
baseline and compared, never used as a key, because library upgrades are
where memory regressions come from.
"""

from __future__ import annotations

import re
from importlib import metadata

SOFTWARE = ("torch", "cuda", "transformers", "peft", "bitsandbytes", "accelerate")


def software_versions() -> dict[str, str]:
    """Versions of the libraries that change memory use; absent ones are left out."""
    import torch

    versions: dict[str, str] = {"torch": str(torch.__version__)}
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    for name in SOFTWARE[2:]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


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


def hardware_key(backend: str, gpu: str | None = None) -> str:
    """The run's hardware key: ``cpu``, the GPU model, or ``estimate:<gpu>`` for predictions of ``gpu``
    (so that predictions are compared with predictions). Several GPUs of one model share one key; a mix
    of models joins them with ``+``."""
    if backend == "estimate":
        from .gpus import DEFAULT_GPU, find_gpu

        return "estimate:" + find_gpu(gpu or DEFAULT_GPU, "--gpumem-estimate-gpu").key
    if backend != "cuda":
        return "cpu"
    import torch

    props = [torch.cuda.get_device_properties(index) for index in range(torch.cuda.device_count())]
    return "+".join(sorted({device_key(p.name, p.total_memory) for p in props}))
