"""The GPUs an estimate can target, and what a real one adds to the bytes of the tensors a step makes.

An estimate counts the storages a step makes (rounded as PyTorch's CUDA
caching allocator rounds them); a real GPU adds three things, each modelled
here with figures measured on the device where we had one:

- **workspaces** inside the allocator: cuBLAS/cuBLASLt keep one workspace per
  handle (per thread and stream), handed out by the caching allocator on a
  thread's first matrix product and kept. A training step multiplies on the
  main thread and on the autograd engine's thread of the device, so two count
  in ``allocated``.
- **reserved** beyond allocated: the caching allocator keeps freed blocks in
  segments it has taken from the device (2 MiB pools for small requests, large
  requests rounded to 2 MiB and split); :func:`reserved_bytes` adds the
  fragmentation measured for a training step.
- **device** beyond reserved: the CUDA context, its modules and the library
  handles, which NVML counts and PyTorch does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .units import BadValue, parse_size

MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class Gpu:
    """A target GPU: its name, memory (bytes), compute capability, and what it keeps outside the step's tensors.

    ``workspace``: bytes of cuBLAS workspaces in the allocator for the two threads of a step;
    ``context``: bytes NVML counts beyond the allocator (the CUDA context and libraries);
    ``measured``: whether ``workspace`` and ``context`` were measured on this GPU, or carried over
    from the nearest one that was.
    """

    name: str
    memory: int
    capability: tuple[int, int] = (9, 0)
    sms: int = 132
    workspace: int = 2 * 32 * MiB + MiB
    context: int = 1_451_098_112
    measured: bool = False

    @property
    def key(self) -> str:
        """The part of the hardware key ``estimate:<gpu>`` that names this GPU."""
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.name).strip("-")


# Measured on an H200 (torch 2.11, CUDA 13): the allocator holds 65 MiB after a forward and backward
# matmul (two 32 MiB cuBLAS workspaces, main and autograd thread, and 1 MiB of cuBLASLt's), and NVML counts
# 1.35 GiB beyond the allocator's reservation (the context, library handles and the driver's own share). Older
# GPUs get cuBLAS's smaller default (":4096:2:16:8", 8.125 MiB a handle); their context is the H200's figure
# (mostly the CUDA runtime and the kernels' images, not the GPU's), not measured.
_OLD_WORKSPACE = 2 * (2 * 4096 * 1024 + 8 * 16 * 1024) + MiB

GPUS: dict[str, Gpu] = {
    gpu.name: gpu
    for gpu in (
        Gpu("H100", 80 * GiB, (9, 0), 132),
        Gpu("H200", 150_109_880_320, (9, 0), 132, measured=True),  # 139.8 GiB: what the device reports
        Gpu("A100-40GB", 40 * GiB, (8, 0), 108, workspace=_OLD_WORKSPACE),
        Gpu("A100-80GB", 80 * GiB, (8, 0), 108, workspace=_OLD_WORKSPACE),
        Gpu("L4", 24 * GiB, (8, 9), 58, workspace=_OLD_WORKSPACE),
        Gpu("A10", 24 * GiB, (8, 6), 72, workspace=_OLD_WORKSPACE),
        Gpu("T4", 16 * GiB, (7, 5), 40, workspace=_OLD_WORKSPACE),
        Gpu("RTX-4090", 24 * GiB, (8, 9), 128, workspace=_OLD_WORKSPACE),
    )
}
"""Known GPUs by name; the memory is what the product is sold with (the usable part is a little less), except
for the H200, whose 141 GB are 139.8 GiB as the device reports them."""

DEFAULT_GPU = "H100"


def _normal(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_gpu(text: str, where: str) -> Gpu:
    """The GPU named ``text`` (``H100``, ``a100-80gb``, ``RTX 4090``) or a GPU of the size ``text`` (``16GiB``);
    BadValue naming ``where`` otherwise."""
    wanted = _normal(str(text))
    for gpu in GPUS.values():
        if _normal(gpu.name) == wanted:
            return gpu
    if wanted in ("a100", "4090", "rtx4090"):
        return GPUS["A100-80GB" if wanted == "a100" else "RTX-4090"]
    try:
        memory = parse_size(text, where)
    except BadValue:
        raise BadValue(
            f"{where}: unknown GPU {text!r}; give one of {', '.join(GPUS)} or a size such as 16GiB"
        ) from None
    if memory < GiB:
        raise BadValue(f"{where}: {text!r} is less than 1 GiB; give the GPU's memory with a unit, e.g. 16GiB")
    return Gpu(f"{memory / GiB:g}GiB", memory)


SMALL_SEGMENT = 2 * MiB
"""The caching allocator serves requests of at most 1 MiB from 2 MiB segments, larger ones from segments
rounded to 2 MiB (20 MiB for requests under 10 MiB)."""

FRAGMENTATION = 0.02
"""Reserved beyond allocated at a training step's peak, as a share of the allocated peak: measured on an H200
for QLoRA Llama 1B and 8B steps without checkpointing, 0.6-3.9% (see benchmarks/results/estimate-accuracy.md)."""


def reserved_bytes(allocated_peak: int, fragmenting: int = 0) -> int:
    """What the caching allocator holds from the device at a step whose allocated peak is ``allocated_peak``:
    the peak in whole 2 MiB segments, the measured fragmentation, and ``fragmenting`` bytes of blocks that
    cannot be reused at the peak. With gradient checkpointing the recomputed layers' blocks are freed and
    re-allocated while the float32 logits and their gradients hold large ones: measured, about one logits
    tensor more (0.5-1.4 of it), which is what callers pass."""
    segments = -(-allocated_peak // SMALL_SEGMENT) * SMALL_SEGMENT
    return segments + int(allocated_peak * FRAGMENTATION) + fragmenting


def device_bytes(reserved: int, gpu: Gpu) -> int:
    """What NVML shows the process using: the allocator's reservation plus the CUDA context and libraries."""
    return reserved + gpu.context
