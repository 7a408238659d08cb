"""One choice of attention kernel: the advisor's memory model and the estimate backend agree, because the
estimate asks the memory model for the kernel of each call it sees."""

from __future__ import annotations

import pytest
import torch

from pytest_gpumem.advise.memory_model import attention_kernel, sdpa_grouped, sdpa_kernel
from pytest_gpumem.core.gpus import find_gpu
from pytest_gpumem.estimate import meter

H200 = find_gpu("H200", "test")


def tensors(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int = 64) -> tuple[torch.Tensor, ...]:
    q = torch.empty(1, heads, 16, head_dim, dtype=dtype, device="meta")
    k = torch.empty(1, kv_heads, 16, head_dim, dtype=dtype, device="meta")
    return q, k, k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_the_estimate_and_the_advisor_pick_the_same_kind_of_kernel(dtype: torch.dtype, masked: bool) -> None:
    """A model with grouped key/value heads, called as transformers calls SDPA: grouped heads only
    without a mask (with one, the key/value heads are repeated first)."""
    grouped = sdpa_grouped(True, masked)
    q, k, v = tensors(dtype, heads=8, kv_heads=2 if grouped else 8)
    mask = torch.empty(1, 1, 16, 16, dtype=torch.bool, device="meta") if masked else None
    exact = meter.attention_kernel(q, k, v, mask, grouped, H200)
    kind = attention_kernel("sdpa", dtype.itemsize, True, "cuda", head_dim=64, masked=masked, capability=(9, 0))
    assert kind == ("math" if exact == "math" else "fused")


def test_the_kernels_as_measured_on_an_h200() -> None:
    assert sdpa_kernel(True, 128, grouped=True, masked=False, capability=(9, 0)) == "cudnn"
    assert sdpa_kernel(True, 128, grouped=False, masked=False, capability=(8, 0)) == "flash"
    assert sdpa_kernel(True, 128, grouped=False, masked=True, capability=(9, 0)) == "efficient"
    assert sdpa_kernel(False, 128, grouped=True, masked=False, capability=(9, 0)) == "math"
    assert sdpa_kernel(False, 128, grouped=False, masked=True, capability=(9, 0)) == "efficient"
    # 16-bit queries with a mask and grouped heads passed as such: no fused kernel takes them.
    assert sdpa_kernel(True, 128, grouped=True, masked=True, capability=(9, 0)) == "math"
