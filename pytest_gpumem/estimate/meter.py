"""The ``estimate`` backend: a test's GPU memory predicted on a machine without a GPU.

The test's tensors live on PyTorch's ``meta`` device, which stands in for one
CUDA device (``cuda:0``): every operator computes only its outputs' shapes and
dtypes, nothing is allocated, and the :class:`~.tracker.StorageTracker`
counts the storages a real GPU would hold, each charged what a model of
PyTorch's CUDA caching allocator charges for it (:mod:`pytest_gpumem.estimate.allocator`,
whose segments are the reserved bytes), with the same records the attribution
reads. A test that makes most of its tensors on real devices instead (a model
loaded with ``device_map="cpu"``) cannot be seen: the meter says so
(:meth:`EstimateMeter.blind_spot`) rather than predict next to nothing.

Why meta, not ``FakeTensorMode`` with a fake CUDA device: on a CPU-only build
of PyTorch, autograd aborts the process (not an exception) when a tensor that
requires grad claims to be on CUDA, since it asks the CUDA device guard,
which such a build lacks. Meta tensors are what fake tensors compute with, so
the bytes are the same; what a fake CUDA device would decide by its type,
:class:`FakeCuda` decides as CUDA does:

- ``scaled_dot_product_attention`` runs the kernel CUDA would pick (flash for
  16-bit inputs on sm80+, memory-efficient where flash cannot and the key/value
  heads are not grouped, else the math kernel, which keeps the attention
  probabilities), each with its own saved tensors;
- optimizers default to their ``foreach`` implementation, as they do on CUDA;
- memory a CUDA kernel allocates inside itself, which no operator returns
  (bitsandbytes' dequantized weight in its 4-bit matmul for large inputs, flash
  attention's float32 accumulators in backward), is counted as scratch alive
  for the moment of the operator;
- a value read from a meta tensor (``.item()``, a ``bool`` of a comparison)
  has no data: it reads as ``True``, ``0`` or ``0.0``, the answer that keeps
  library code on its usual path (no packed sequences, no padding).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from pytest_gpumem.advise.memory_model import sdpa_kernel
from pytest_gpumem.core.gpus import Gpu, reserved_bytes
from pytest_gpumem.core.sample import Peaks
from pytest_gpumem.core.units import format_bytes
from pytest_gpumem.estimate.allocator import Block, CachingAllocator
from pytest_gpumem.measure.collector import release_failures
from pytest_gpumem.measure.meters.tracker import ACTIVATIONS, ALIVE, StorageTracker, block_size

DEVICE = "cuda:0"
"""The name the estimate's one GPU is counted under."""

_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default


def _bytes(shape: Any, dtype: torch.dtype) -> int:
    return math.prod(int(n) for n in shape) * torch.empty((), dtype=dtype, device="meta").element_size()


def _gemm_4bit_scratch(args: tuple[Any, ...], kwargs: dict[str, Any], gpu: Gpu) -> int:
    """bitsandbytes' CUDA 4-bit matmul: for many rows it dequantizes the weight to the input's dtype (and a
    nested absmax to float32, twice) and calls ``linear``; for few rows a fused kernel needs nothing."""
    a, shape_b = args[0], args[2]
    k = int(a.shape[-1])
    m = a.numel() // max(1, k)
    if m <= 4 or (a.dtype == torch.float32 and m < 8):
        return 0
    # bitsandbytes' own heuristic between 5 and 1536 rows depends on the shape; its fused kernel wins below
    # a few hundred rows on the data-centre GPUs, which is where it is used here.
    if m <= 1536 and (gpu.capability[0] < 8 or m <= 320):
        return 0
    scratch = block_size(_bytes(shape_b, a.dtype))
    absmax_8bit = kwargs.get("absmax_8bit", args[7] if len(args) > 7 else None)
    if absmax_8bit is not None:
        scratch += 2 * block_size(absmax_8bit.numel() * 4)
    return scratch


def _flash_backward_scratch(args: tuple[Any, ...], kwargs: dict[str, Any], gpu: Gpu) -> int:
    """Flash attention's backward: float32 accumulators of dq and of the softmax's row sums, and for grouped
    key/value heads dk and dv expanded to every query head."""
    query, key = args[1], args[2]
    b, h, s, d = (int(n) for n in query.shape)
    s_k, h_k = int(key.shape[2]), int(key.shape[1])
    rounded = -(-s // 128) * 128
    d_rounded = -(-d // 32) * 32
    scratch = block_size(b * rounded * h * d_rounded * 4) + block_size(b * h * rounded * 4)
    if h_k != h:
        scratch += 2 * block_size(b * s_k * h * d * query.element_size())
    return scratch


def _safe_softmax_scratch(args: tuple[Any, ...], kwargs: dict[str, Any], gpu: Gpu) -> int:
    """``_safe_softmax`` (the math attention's softmax) finds the fully masked rows through a bool mask of
    its input's size, alive while it writes its output."""
    x = args[0]
    return block_size(x.numel()) + block_size(x.numel() // max(1, int(x.shape[-1])))


def _softmax_backward_scratch(args: tuple[Any, ...], kwargs: dict[str, Any], gpu: Gpu) -> int:
    """CUDA's softmax backward computes the product of the gradient and the output into a buffer of the
    output's size before reducing it (measured: one output's bytes beside the output)."""
    return block_size(args[0].numel() * args[0].element_size())


def _cudnn_backward_scratch(args: tuple[Any, ...], kwargs: dict[str, Any], gpu: Gpu) -> int:
    """cuDNN attention's backward (measured on an H200): three query-sized buffers and the float32 row
    statistics, and for grouped key/value heads dk and dv expanded to every query head."""
    query, key = args[1], args[2]
    b, h, s, _ = (int(n) for n in query.shape)
    q_bytes = block_size(query.numel() * query.element_size())
    scratch = 3 * q_bytes + block_size(b * h * s * 4)
    if int(key.shape[1]) != h:
        scratch += 2 * q_bytes
    return scratch


def _efficient_backward_scratch(args: tuple[Any, ...], kwargs: dict[str, Any], gpu: Gpu) -> int:
    """Memory-efficient attention's backward (measured on an H200, float32): two query-sized accumulators
    and the row statistics twice."""
    query = args[1]
    b, h, s, _ = (int(n) for n in query.shape)
    return 2 * block_size(query.numel() * query.element_size()) + 2 * block_size(b * h * (-(-s // 32) * 32) * 4)


def _int8_scaled_mm_scratch(args: tuple[Any, ...], kwargs: dict[str, Any], gpu: Gpu) -> int:
    """The int32 product the CUDA kernel makes before it dequantizes into the output."""
    a, b = args[0], args[1]
    return block_size(a.numel() // a.shape[-1] * b.shape[0] * 4)


SCRATCH = {
    "aten::_scaled_dot_product_cudnn_attention_backward": _cudnn_backward_scratch,
    "aten::_scaled_dot_product_efficient_attention_backward": _efficient_backward_scratch,
    "bitsandbytes::gemm_4bit": _gemm_4bit_scratch,
    "bitsandbytes::int8_scaled_mm": _int8_scaled_mm_scratch,
    "aten::_safe_softmax": _safe_softmax_scratch,
    "aten::_softmax_backward_data": _softmax_backward_scratch,
    "aten::_scaled_dot_product_flash_attention_backward": _flash_backward_scratch,
}
"""Operator name -> the bytes its CUDA kernel allocates inside itself, alive while it runs."""


def active_tracker() -> EstimateTracker | None:
    """The estimate's tracker counting now (innermost), if any."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in reversed(_get_current_dispatch_mode_stack()):
        if isinstance(mode, EstimateTracker):
            return mode
    return None


@contextlib.contextmanager
def untracked() -> Iterator[None]:
    """Run the enclosed code with no dispatch mode active: nothing it makes is counted."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


class EstimateTracker(StorageTracker):
    """A :class:`StorageTracker` of meta storages counted as one CUDA device, with that device's scratch.

    Every storage goes through a model of the CUDA caching allocator (:mod:`pytest_gpumem.estimate.allocator`), so
    that each is charged what the real allocator would charge for it at that moment, and the segments it
    would reserve are known.
    """

    def __init__(self, gpu: Gpu, attribute: bool = False) -> None:
        super().__init__(attribute=attribute, allocator_blocks=True, meta_device=DEVICE)
        self.gpu = gpu
        self.current[DEVICE] = 0
        self.peak[DEVICE] = 0
        self.allocator = CachingAllocator()
        self._blocks: dict[int, tuple[Block, int]] = {}  # storage -> (its block, the bytes it asked for)
        # What the test made, on the fake GPU and on real devices (which it cannot see): storages and bytes.
        self.made = [0, 0]
        self.elsewhere: dict[str, list[int]] = {}

    def _elsewhere(self, device: str, nbytes: int) -> None:
        made = self.elsewhere.setdefault(device, [0, 0])
        made[0] += 1
        made[1] += nbytes

    def _charge(self, key: int, nbytes: int) -> int:
        self.made[0] += 1
        self.made[1] += nbytes
        block = self.allocator.malloc(nbytes)
        if block is None:
            return 0
        self._blocks[key] = (block, nbytes)
        return block.size

    def _release(self, key: int, _ref: object = None) -> None:
        super()._release(key, _ref)
        entry = self._blocks.pop(key, None)
        if entry is not None:
            self.allocator.free(entry[0])

    def adopt(self, tensors: list[Any]) -> None:
        """Count the storages of ``tensors`` that were made while nothing counted (see :func:`untracked`),
        as if made now; those already counted are left as they are."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
                self._count(tensor)

    def lay_out(self, first: tuple[int, ...] = ()) -> None:
        """Place what is alive now in a fresh allocator, after blocks of ``first`` bytes that no storage
        owns (the cuBLAS workspaces), in the order it was made: as if it had been loaded without the
        transients of loading (a checkpoint's 16-bit weights before quantization, which ``from_pretrained``
        frees one by one and ``prepare_model_for_kbit_training`` gives back with ``empty_cache``)."""
        allocator = CachingAllocator()
        for nbytes in first:
            allocator.malloc(nbytes)
        blocks = {}
        for key, (_, requested) in self._blocks.items():
            block = allocator.malloc(requested)
            if block is not None:
                blocks[key] = (block, requested)
                entry = self._live.get(key)
                if entry is not None:
                    entry[1][0] = block.size
        self.allocator, self._blocks = allocator, blocks
        self.current[DEVICE] = sum(block.size for block, _ in blocks.values())
        self.peak[DEVICE] = max(self.peak.get(DEVICE, 0), self.current[DEVICE])

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is _LOCAL_SCALAR and args[0].device.type == "meta":
            return _placeholder(args[0].dtype)
        name = func._schema.name if hasattr(func, "_schema") else ""
        if name in _INT8_OUTLIERS and args[0].device.type == "meta":
            return _INT8_OUTLIERS[name](args, kwargs or {})
        out = super().__torch_dispatch__(func, types, args, kwargs)
        scratch = SCRATCH.get(name)
        if scratch is not None:
            nbytes = scratch(args, kwargs or {}, self.gpu)
            if nbytes:
                self.scratch(nbytes)
        return out

    def scratch(self, nbytes: int) -> None:
        """Count ``nbytes`` alive for one moment on the device, beside everything alive now."""
        block = self.allocator.malloc(nbytes)
        if block is None:
            return
        nbytes = block.size
        self.allocator.free(block)
        self.seq += 1
        now = self.current[DEVICE] + nbytes
        if now > self.peak.get(DEVICE, 0):
            self.peak[DEVICE] = now
        if self.attribute:
            record = [nbytes, DEVICE, self.seq, ALIVE, ACTIVATIONS, self.layer_depth > 0]
            self.records.append(record)
            if self.window is not None:
                self._note(DEVICE, now)
            self.seq += 1
            record[3] = self.seq


# LLM.int8() splits off its outlier columns, whose number depends on the values, which meta tensors lack:
# count none (their index and the 16-bit product over them are a sliver of a layer's memory).


def _int8_quant_without_outliers(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    quantize = torch.ops.bitsandbytes.int8_vectorwise_quant.default
    out_row, row_stats, _ = quantize(args[0], 0.0)
    return out_row, row_stats, torch.empty(0, dtype=torch.int64, device=args[0].device)


def _int8_matmul_without_outliers(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a, ca, cb, sca, scb = args[:5]
    bias = args[6] if len(args) > 6 else kwargs.get("bias")
    out = torch.ops.bitsandbytes.int8_scaled_mm.default(ca, cb, sca, scb, bias, a.dtype)
    return out, None


_INT8_OUTLIERS = {
    "bitsandbytes::int8_vectorwise_quant": _int8_quant_without_outliers,
    "bitsandbytes::int8_mixed_scaled_mm": _int8_matmul_without_outliers,
}


def _placeholder(dtype: torch.dtype) -> Any:
    if dtype == torch.bool:
        return True
    return 0.0 if dtype.is_floating_point else 0


# -- what CUDA decides by the device


def attention_kernel(query: Any, key: Any, value: Any, mask: Any, enable_gqa: bool, gpu: Gpu) -> str:
    """The SDPA kernel CUDA runs for these inputs on ``gpu``: :func:`~pytest_gpumem.advise.memory_model.sdpa_kernel`,
    for the fused kernels' shapes (4-D, one head size for query, key and value); else ``math``."""
    head = int(query.shape[-1])
    if query.dim() != 4 or not int(key.shape[-1]) == int(value.shape[-1]) == head:
        return "math"
    grouped = enable_gqa and int(key.shape[-3]) != int(query.shape[-3])
    half = query.dtype in (torch.float16, torch.bfloat16)
    return sdpa_kernel(half, head, grouped, mask is not None, gpu.capability)


def _sdpa(
    gpu: Gpu,
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Any:
    kernel = attention_kernel(query, key, value, attn_mask, enable_gqa, gpu)
    aten = torch.ops.aten
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if kernel == "cudnn":
        return aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, needs_grad, dropout_p, is_causal, False, scale=scale
        )[0]
    if kernel == "flash":
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if kernel == "efficient":
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, needs_grad, dropout_p, is_causal, scale=scale
        )[0]
    return aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa
    )[0]


class FakeCuda(TorchFunctionMode):
    """Makes meta tensors behave as CUDA ones where PyTorch decides by the device (see the module docstring)."""

    def __init__(self, gpu: Gpu) -> None:
        super().__init__()
        self.gpu = gpu
        self._restore: list[tuple[Any, str, Any]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and args and args[0].device.type == "meta":
            return _sdpa(self.gpu, *args, **kwargs)
        return func(*args, **kwargs)

    def __enter__(self) -> FakeCuda:
        # Optimizers choose foreach (multi-tensor) implementations for the devices listed here; CUDA is.
        from torch.optim import optimizer
        from torch.utils import _foreach_utils

        def devices() -> list[str]:
            return ["cuda", "xpu", "meta"]

        for module in (_foreach_utils, optimizer):
            name = "_get_foreach_kernels_supported_devices"
            if hasattr(module, name):
                self._restore.append((module, name, getattr(module, name)))
                setattr(module, name, devices)
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for module, name, value in reversed(self._restore):
            setattr(module, name, value)
        self._restore = []


@contextlib.contextmanager
def fake_cuda(gpu: Gpu) -> Iterator[None]:
    """CUDA's choices for meta tensors while inside (attention kernels, foreach optimizers)."""
    with FakeCuda(gpu):
        yield


def forget_meta_caches() -> None:
    """Drop what libraries cached on the meta device during an estimate, so that later real work in the same
    process does not meet it: bitsandbytes keeps its blockwise quantization code map per process, made on
    the device of the first tensor it quantized."""
    functional = sys.modules.get("bitsandbytes.functional")
    cache = getattr(functional, "name2qmap", None)
    if isinstance(cache, dict):
        for name, value in list(cache.items()):
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                del cache[name]


class EstimateMeter:
    """Meter of the ``estimate`` backend: the predicted allocated peak of a test on ``gpu``, and the
    reservation of the allocator model (see :mod:`pytest_gpumem.estimate.allocator`), as the CLI estimates them.

    The fake GPU starts empty, so every value is the test's own share, as the cuda meter reports it; the
    cuBLAS workspaces are left out as the cuda meter leaves them out (it makes them before a test).
    """

    backend = "estimate"
    metrics: tuple[str, ...] = ("allocated", "reserved", "device")

    def __init__(self, gpu: Gpu, attribute: bool = True) -> None:
        self.gpu = gpu
        self.hardware = f"estimate:{gpu.key}"
        self._attribute = attribute
        self._tracker: EstimateTracker | None = None
        self._fake: FakeCuda | None = None
        self.unseen: dict[str, int] = {}  # after end(): bytes made per device, where most were off the fake GPU

    def blind_spot(self, nodeid: str) -> str | None:
        """After :meth:`end`: why the last test could not be measured, in one line, or None. A test that makes
        more tensors on real devices than on the fake GPU (a model loaded with ``device_map="cpu"``, say) runs
        where the fake GPU cannot see it: its prediction would read next to nothing, which is no prediction."""
        if not self.unseen:
            return None

        fake = self.unseen.get("the fake GPU", 0)
        real = {device: nbytes for device, nbytes in self.unseen.items() if device != "the fake GPU"}
        where = ", ".join(f"{format_bytes(nbytes)} on {device}" for device, nbytes in sorted(real.items()))
        return (
            f"gpumem: the estimate backend could not see {nodeid}: it made most of its tensors on real devices "
            f"({where}), {format_bytes(fake)} on the fake GPU (the meta device), so no prediction, result or baseline "
            "is recorded for it; build its model on the meta device (the quantized_model fixture does) or "
            "measure it with --gpumem-backend=cpu"
        )

    @property
    def tracker(self) -> EstimateTracker | None:
        """The running tracker, for attribution (None outside begin/end or without attribution)."""
        return self._tracker if self._attribute else None

    @property
    def fake_device(self) -> EstimateTracker:
        """The fake GPU while measuring: what is allocated on it and its allocator model, attributing or not."""
        assert self._tracker is not None, "fake_device outside begin()/end()"
        return self._tracker

    def begin(self) -> Peaks:
        release_failures()
        self.unseen = {}
        self._fake = FakeCuda(self.gpu)
        self._fake.__enter__()
        self._tracker = EstimateTracker(self.gpu, attribute=self._attribute)
        self._tracker.__enter__()
        return {}

    def mark(self) -> Peaks:
        assert self._tracker is not None, "mark() outside begin()/end()"
        peak = self._tracker.restart_peak().get(DEVICE, 0)
        allocator = self._tracker.allocator
        reserved = reserved_bytes(allocator.peak_reserved, peak)  # modelled: the allocator model's segments
        allocator.reset_peaks()
        # Like the cuda meter's, ``device`` is the test's share: what NVML would count beyond what was in use
        # before, the context being there already; so it is the reservation.
        return {"allocated": {DEVICE: peak}, "reserved": {DEVICE: reserved}, "device": {DEVICE: reserved}}

    def end(self) -> None:
        if self._tracker is not None:
            # Most of the test's tensors made on real devices: its model is not on the fake GPU. Counted in
            # tensors, not bytes: from_pretrained builds a model's skeleton on the meta device, as large as the
            # model, before it loads the weights where device_map says; the step then makes many more.
            tracker = self._tracker
            if sum(count for count, _ in tracker.elsewhere.values()) > tracker.made[0]:
                self.unseen = {device: nbytes for device, (_, nbytes) in tracker.elsewhere.items()}
                self.unseen["the fake GPU"] = tracker.made[1]
            self._tracker.__exit__(None, None, None)
            self._tracker.forget()
            self._tracker = None
        if self._fake is not None:
            self._fake.__exit__(None, None, None)
            self._fake = None
        forget_meta_caches()
