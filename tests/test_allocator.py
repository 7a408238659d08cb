"""The model of PyTorch's CUDA caching allocator that the estimate charges storages through."""

from __future__ import annotations

import pytest

from pytest_gpumem.estimate.allocator import CachingAllocator, round_size, segment_size

MiB = 2**20


@pytest.mark.parametrize(
    "nbytes, rounded, segment",
    [
        (1, 512, 2 * MiB),  # the smallest block, from the small pool's 2 MiB segments
        (1000, 1024, 2 * MiB),
        (MiB, MiB, 2 * MiB),  # up to 1 MiB: the small pool
        (MiB + 1, MiB + 512, 20 * MiB),  # above: the large pool; under 10 MiB a 20 MiB segment
        (10 * MiB, 10 * MiB, 10 * MiB),  # from 10 MiB: the request rounded up to 2 MiB
        (11 * MiB, 11 * MiB, 12 * MiB),
    ],
)
def test_rounding_and_segments(nbytes: int, rounded: int, segment: int) -> None:
    assert round_size(nbytes) == rounded
    assert segment_size(rounded) == segment


def test_a_block_left_unsplit_is_charged_whole() -> None:
    """11 MiB in a new 12 MiB segment leaves 1 MiB, too little to split off in the large pool: the tensor is
    charged 12 MiB, as memory_allocated reports it."""
    allocator = CachingAllocator()
    block = allocator.malloc(11 * MiB)
    assert block is not None and block.size == 12 * MiB
    assert allocator.allocated == allocator.reserved == 12 * MiB


def test_a_small_large_request_splits_a_20_mib_segment() -> None:
    allocator = CachingAllocator()
    first = allocator.malloc(5 * MiB)
    second = allocator.malloc(5 * MiB)  # the rest of the same segment
    assert first is not None and second is not None
    assert allocator.allocated == 10 * MiB and allocator.reserved == 20 * MiB and allocator.segments == 1
    assert second.ptr == first.ptr + 5 * MiB


def test_freed_blocks_are_cached_merged_and_reused_best_fit() -> None:
    allocator = CachingAllocator()
    a, b, c = (allocator.malloc(4 * MiB) for _ in range(3))  # one 20 MiB segment, 8 MiB left free
    assert a is not None and b is not None and c is not None
    allocator.free(a)
    allocator.free(b)  # merges with a: one free 8 MiB block at the segment's start
    reused = allocator.malloc(7 * MiB)  # the 8 MiB block fits best (the 8 MiB tail too: lower address wins)
    assert reused is not None and reused.ptr == a.ptr and reused.size == 8 * MiB  # 1 MiB left: not split
    assert allocator.reserved == 20 * MiB and allocator.peak_reserved == 20 * MiB
    assert allocator.allocated == 12 * MiB


def test_empty_cache_returns_only_wholly_free_segments() -> None:
    allocator = CachingAllocator()
    kept = allocator.malloc(12 * MiB)
    freed = allocator.malloc(12 * MiB)
    partial = allocator.malloc(2 * MiB)  # a 20 MiB segment, partly used
    assert kept is not None and freed is not None and partial is not None
    allocator.free(freed)
    allocator.empty_cache()
    assert allocator.reserved == 12 * MiB + 20 * MiB and allocator.segments == 2
    allocator.free(partial)
    allocator.empty_cache()
    assert allocator.reserved == 12 * MiB and allocator.allocated == 12 * MiB


def test_peaks_and_their_reset() -> None:
    allocator = CachingAllocator()
    block = allocator.malloc(30 * MiB)
    assert block is not None
    allocator.free(block)
    assert allocator.peak_allocated == 30 * MiB and allocator.allocated == 0
    allocator.reset_peaks()
    assert allocator.peak_allocated == 0 and allocator.peak_reserved == 30 * MiB  # the segment stays cached
    assert allocator.malloc(0) is None and allocator.allocated == 0
