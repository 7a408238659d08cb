"""A model of PyTorch's CUDA caching allocator, for the estimate: what a step's tensors cost on a real GPU.

The estimate sees every storage a step makes and frees, in order; on a GPU,
each request goes through the caching allocator, which charges more than the
bytes asked for, and reserves more than it charges. Both depend on the order
and sizes of the requests, so they are modelled by replaying the requests
through the allocator's own rules (``c10/cuda/CUDACachingAllocator.cpp``, with
its default configuration):

- a request is rounded up to 512 bytes; up to 1 MiB it is served from the
  small pool's 2 MiB segments, above from the large pool;
- a large request that no cached block fits gets a new segment: 20 MiB under
  10 MiB, else the request rounded up to 2 MiB;
- a request takes the smallest cached block that fits (the lowest address
  among equals), and splits it only if what remains is over 1 MiB (large pool)
  or at least 512 bytes (small pool). A block that is not split is charged
  whole: ``memory_allocated`` counts it, up to 1 MiB more than asked, which is
  how a tensor of 11 MiB holds 12;
- a freed block merges with free neighbours of its segment and stays cached;
  ``empty_cache`` returns the segments that are wholly free.

``allocated`` and ``reserved`` (the segments) and their peaks are what
``torch.cuda.memory_allocated`` / ``memory_reserved`` and their ``max_``
variants report. Not modelled: streams other than the default one, a memory
limit (the retries that free the cache when the device is full), and allocator
settings (``PYTORCH_CUDA_ALLOC_CONF``: expandable segments, a split size limit,
rounding to powers of two).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MiB = 2**20
MIN_BLOCK = 512
SMALL_SIZE = MiB  # requests up to this size come from the small pool
SMALL_BUFFER = 2 * MiB  # the small pool's segment size
LARGE_BUFFER = 20 * MiB  # the segment of a large request under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 * MiB
ROUND_LARGE = 2 * MiB  # larger segments are the request rounded up to this


def round_size(nbytes: int) -> int:
    """The bytes the allocator serves for a request of ``nbytes`` (0 for none)."""
    if nbytes <= 0:
        return 0
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    """The segment a rounded request gets when no cached block fits it."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class Block:
    """A piece of a segment: allocated to one request, or free and cached."""

    ptr: int
    size: int
    small: bool
    allocated: bool = False
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)


class CachingAllocator:
    """The caching allocator of one device and stream: ``malloc`` returns the block of a request (None for
    an empty one), ``free`` gives it back; the statistics follow the real allocator's."""

    def __init__(self) -> None:
        self._free: dict[bool, list[tuple[int, int, Block]]] = {True: [], False: []}  # small? -> (size, ptr)
        self._next_address = 0
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.segments = 0

    def malloc(self, nbytes: int) -> Block | None:
        size = round_size(nbytes)
        if size == 0:
            return None
        small = size <= SMALL_SIZE
        block = self._take_free(size, small)
        if block is None:
            block = self._new_segment(segment_size(size), small)
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            rest = Block(block.ptr + size, remaining, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert_free(rest)
        block.allocated = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        block.allocated = False
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._remove_free(neighbour)
                if neighbour is block.prev:
                    neighbour.size += block.size
                    neighbour.next = block.next
                    if block.next is not None:
                        block.next.prev = neighbour
                    block = neighbour
                else:
                    block.size += neighbour.size
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
        self._insert_free(block)

    def empty_cache(self) -> None:
        """Give back every segment that is wholly free, as ``torch.cuda.empty_cache`` does."""
        for small in (True, False):
            kept = []
            for entry in self._free[small]:
                block = entry[2]
                if block.prev is None and block.next is None:
                    self.reserved -= block.size
                    self.segments -= 1
                else:
                    kept.append(entry)
            self._free[small] = kept

    def reset_peaks(self) -> None:
        """Start the peaks at the current levels, as ``torch.cuda.reset_peak_memory_stats`` does."""
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved

    def _new_segment(self, size: int, small: bool) -> Block:
        block = Block(self._next_address, size, small)
        self._next_address += size
        self.reserved += size
        self.segments += 1
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def _take_free(self, size: int, small: bool) -> Block | None:
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i == len(pool):
            return None
        return pool.pop(i)[2]

    def _insert_free(self, block: Block) -> None:
        bisect.insort(self._free[block.small], (block.size, block.ptr, block))

    def _remove_free(self, block: Block) -> None:
        pool = self._free[block.small]
        i = bisect.bisect_left(pool, (block.size, block.ptr))
        assert pool[i][2] is block, "a free block is missing from its pool"
        del pool[i]
