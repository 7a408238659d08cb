"""The GPUs an estimate can target, and what a real one adds to the bytes of the tensors a step makes.

An estimate replays the storages a step makes through a model of PyTorch's
CUDA caching allocator (:mod:`pytest_gpumem.estimate.allocator`), which gives what the
allocator charges and the segments it reserves. A real GPU adds two things,
given here per GPU:

- **workspaces** inside the allocator: cuBLAS/cuBLASLt keep one workspace per
  handle (per thread and stream), handed out by the caching allocator on a
  thread's first matrix product and kept. A training step multiplies on the
  main thread and on the autograd engine's thread of the device, so two count
  in ``allocated``. Their size is PyTorch's default for the architecture.
- **device** beyond reserved: the CUDA context, its modules and the library
  handles, which NVML counts and PyTorch does not.

Each GPU says which of its figures were measured on that GPU; the others are
assumed (carried over from the GPU that was measured), and the estimate says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pytest_gpumem.core.units import BadValue, parse_size

MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class Gpu:
    """A target GPU: its name, memory (bytes), compute capability, and what it keeps outside the step's tensors.

    ``workspace``: bytes of cuBLAS workspaces in the allocator for the two threads of a step;
    ``context``: bytes NVML counts beyond the allocator (the CUDA context and libraries);
    ``measured``: which of ``workspace`` and ``context`` were measured on this GPU (the others are assumed).
    """

    name: str
    memory: int
    capability: tuple[int, int] = (9, 0)
    sms: int = 132
    workspace: int = 2 * 32 * MiB + MiB
    context: int = 1_451_098_112
    measured: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The part of the hardware key ``estimate:<gpu>`` that names this GPU."""
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.name).strip("-")

    @property
    def workspace_blocks(self) -> tuple[int, ...]:
        """The workspaces as the allocator hands them out: one cuBLAS workspace for each of the step's two
        threads, and cuBLASLt's 1 MiB."""
        handle = (self.workspace - MiB) // 2
        return (handle, handle, MiB)

    @property
    def assumed(self) -> tuple[str, ...]:
        """The figures not measured on this GPU."""
        return tuple(name for name in ("workspace", "context") if name not in self.measured)

    def provenance(self) -> str:
        """One line: which of the GPU's figures were measured on it, and where the others come from."""
        if not self.assumed:
            return f"{self.name}: cuBLAS workspaces and CUDA context measured on an {self.name}"
        sources = {
            "workspace": f"cuBLAS workspaces ({self.workspace / MiB:g} MiB) assumed from PyTorch's default for "
            f"sm{self.capability[0]}{self.capability[1]}",
            "context": f"CUDA context ({self.context / GiB:.2f} GiB) assumed from the H200 measurement",
        }
        return f"{self.name}: " + "; ".join(sources[name] for name in self.assumed) + " (not measured on this GPU)"


# Measured on an H200 (torch 2.11, CUDA 13): the allocator holds 65 MiB after a forward and backward
# matmul (two 32 MiB cuBLAS workspaces, main and autograd thread, and 1 MiB of cuBLASLt's), and NVML counts
# 1.35 GiB beyond the allocator's reservation (the context, library handles and the driver's own share).
# Other GPUs get PyTorch's workspace default for their architecture (32 MiB a handle on sm90, ":4096:2:16:8",
# 8.125 MiB, before it) and the H200's context (mostly the CUDA runtime and the kernels' images, not the
# GPU's): both assumed, and said to be.
_OLD_WORKSPACE = 2 * (2 * 4096 * 1024 + 8 * 16 * 1024) + MiB

GPUS: dict[str, Gpu] = {
    gpu.name: gpu
    for gpu in (
        Gpu("H100", 80 * GiB, (9, 0), 132),
        Gpu("H200", 150_109_880_320, (9, 0), 132, measured=("workspace", "context")),  # 139.8 GiB, as reported
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


FRAGMENTATION = -0.0034
"""Reserved beyond the allocator model's segments, as a share of the allocated peak: what the model misses
(how loading leaves the segments). Fitted on the in-sample runs of benchmarks/estimate_accuracy.py (the median
error's share), which reports the fit beside the out-of-sample errors: slightly negative, the model's
segments being a little more than the H200 reserved."""


def reserved_bytes(segments: int, allocated_peak: int) -> int:
    """The modelled reservation at a step's peak: the allocator model's ``segments`` and the fitted share
    (never less than the peak itself takes in whole segments)."""
    return max(segments + int(allocated_peak * FRAGMENTATION), whole_segments(allocated_peak))


def whole_segments(allocated_peak: int) -> int:
    """The analytic fallback's segments, where no step ran to replay through the allocator model: the
    allocated peak in whole 2 MiB segments (a lower bound: the caching allocator keeps freed blocks too)."""
    return -(-allocated_peak // SMALL_SEGMENT) * SMALL_SEGMENT


def device_bytes(reserved: int, gpu: Gpu) -> int:
    """What NVML shows the process using: the allocator's reservation plus the CUDA context and libraries."""
    return reserved + gpu.context


def device_gpu(name: str, memory: int) -> Gpu:
    """The catalogue's GPU for a CUDA device as it names itself (``NVIDIA H100 80GB HBM3``) with its memory,
    else a GPU of that memory."""
    words = set(re.findall(r"[a-z0-9]+", name.lower()))
    for gpu in GPUS.values():
        if gpu.name.split("-")[0].lower() in words and abs(gpu.memory - memory) <= 0.1 * gpu.memory:
            return gpu
    return Gpu(f"{memory / GiB:g}GiB", memory)
