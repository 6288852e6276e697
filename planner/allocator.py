"""Replay an allocation sequence through a model of PyTorch's CUDA caching allocator.

Peak *allocated* bytes understate what a GPU needs: the caching allocator rounds sizes, carves
tensors out of segments (2 MiB for small tensors, 20 MiB for 1-10 MiB ones, exact 2 MiB-rounded
segments for large ones), best-fit splits free blocks, and cannot hand back a segment while any
block of it is in use. Large tensors freed and re-split for smaller ones leave holes the next
large tensor cannot use, so new segments are made. :func:`replay` mimics those rules
(``c10/cuda/CUDACachingAllocator.cpp``: ``round_size``, ``get_allocation_size``,
``get_free_block`` best fit, ``should_split``, coalescing on free) and reports the memory *needed*:
the sum of segments holding at least one live block, which is what remains when PyTorch frees
unused cached segments on an out-of-memory retry.

With ``expandable_segments`` each pool is one virtual segment that grows by mapping 2 MiB pages;
under pressure free pages are unmapped, so the need is the pages touched by live blocks.
Pure Python, no torch: the profiler records the sequence, the planner keeps the ratios.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MIB = 1 << 20
MIN_BLOCK = 512
SMALL_SIZE = 1 * MIB
SMALL_BUFFER = 2 * MIB
LARGE_BUFFER = 20 * MIB
MIN_LARGE_ALLOC = 10 * MIB
ROUND_LARGE = 2 * MIB
PAGE = 2 * MIB


def round_size(nbytes: int) -> int:
    return MIN_BLOCK if nbytes < MIN_BLOCK else -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(nbytes: int) -> int:
    if nbytes <= SMALL_SIZE:
        return SMALL_BUFFER
    if nbytes < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-nbytes // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class _Block:
    segment: int
    offset: int
    size: int
    free: bool = True
    prev: _Block | None = None
    next: _Block | None = None

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.segment, self.offset)


@dataclass
class _Pool:
    small: bool
    expandable: bool
    free: list[tuple[int, int, int]] = field(default_factory=list)
    blocks: dict[tuple[int, int, int], _Block] = field(default_factory=dict)
    segments: list[int] = field(default_factory=list)  # sizes
    live_blocks: list[int] = field(default_factory=list)  # per segment
    tail: _Block | None = None  # expandable: last block of the one segment

    def add_free(self, block: _Block) -> None:
        block.free = True
        key = block.key()
        bisect.insort(self.free, key)
        self.blocks[key] = block

    def remove_free(self, block: _Block) -> None:
        key = block.key()
        i = bisect.bisect_left(self.free, key)
        del self.free[i]
        del self.blocks[key]

    def best_fit(self, size: int) -> _Block | None:
        i = bisect.bisect_left(self.free, (size, -1, -1))
        return self.blocks[self.free[i]] if i < len(self.free) else None


@dataclass
class ReplayResult:
    allocated_peak: int
    needed_peak: int  # memory the process needs at its worst moment under this allocator

    @property
    def ratio(self) -> float:
        return self.needed_peak / self.allocated_peak if self.allocated_peak else 1.0


class AllocatorModel:
    def __init__(self, expandable_segments: bool = False) -> None:
        self.expandable = expandable_segments
        self.pools = {True: _Pool(True, expandable_segments), False: _Pool(False, expandable_segments)}
        self.live: dict[int, tuple[_Block, _Pool]] = {}
        self.allocated = self.allocated_peak = 0
        self.needed = self.needed_peak = 0
        self.page_users: dict[tuple[bool, int], int] = {}

    # -- events ------------------------------------------------------------------------------
    def malloc(self, key: int, nbytes: int) -> None:
        size = round_size(nbytes)
        pool = self.pools[size <= SMALL_SIZE]
        block = pool.best_fit(size)
        if block is None:
            block = self._grow(pool, size)
        else:
            pool.remove_free(block)
        remaining = block.size - size
        if remaining >= MIN_BLOCK if pool.small else remaining > SMALL_SIZE:
            rest = _Block(block.segment, block.offset + size, remaining, True, block, block.next)
            if block.next is not None:
                block.next.prev = rest
            elif pool.expandable:
                pool.tail = rest
            block.next = rest
            block.size = size
            pool.add_free(rest)
        block.free = False
        self.live[key] = (block, pool)
        self.allocated += block.size
        self.allocated_peak = max(self.allocated_peak, self.allocated)
        self._use(pool, block, +1)

    def free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is None:
            return
        block, pool = entry
        self.allocated -= block.size
        self._use(pool, block, -1)
        if block.next is not None and block.next.free:
            pool.remove_free(block.next)
            _absorb(pool, block, block.next)
        if block.prev is not None and block.prev.free:
            pool.remove_free(block.prev)
            block = _absorb(pool, block.prev, block)
        pool.add_free(block)

    # -- internals ---------------------------------------------------------------------------
    def _grow(self, pool: _Pool, size: int) -> _Block:
        if not pool.expandable:
            seg = len(pool.segments)
            pool.segments.append(segment_size(size))
            pool.live_blocks.append(0)
            return _Block(seg, 0, pool.segments[seg], True)
        # One segment that grows at its end, merging a free tail block.
        if not pool.segments:
            pool.segments.append(0)
            pool.live_blocks.append(0)
        tail = pool.tail
        if tail is not None and tail.free:
            pool.remove_free(tail)
            grow = -(-(size - tail.size) // PAGE) * PAGE
            tail.size += grow
            pool.segments[0] += grow
            return tail
        grow = -(-size // PAGE) * PAGE
        block = _Block(0, pool.segments[0], grow, True, tail, None)
        if tail is not None:
            tail.next = block
        pool.tail = block
        pool.segments[0] += grow
        return block

    def _use(self, pool: _Pool, block: _Block, delta: int) -> None:
        if pool.expandable:
            first, last = block.offset // PAGE, (block.offset + block.size - 1) // PAGE
            for page in range(first, last + 1):
                key = (pool.small, page)
                users = self.page_users.get(key, 0) + delta
                if users == 0:
                    del self.page_users[key]
                    self.needed -= PAGE
                else:
                    if users == 1 and delta > 0:
                        self.needed += PAGE
                    self.page_users[key] = users
        else:
            before = pool.live_blocks[block.segment]
            pool.live_blocks[block.segment] = before + delta
            if before == 0 and delta > 0:
                self.needed += pool.segments[block.segment]
            elif before + delta == 0:
                self.needed -= pool.segments[block.segment]
        self.needed_peak = max(self.needed_peak, self.needed)


def _absorb(pool: _Pool, left: _Block, right: _Block) -> _Block:
    """Merge ``right`` into its neighbour ``left`` (coalescing free blocks of one segment)."""
    left.size += right.size
    left.next = right.next
    if right.next is not None:
        right.next.prev = left
    elif pool.expandable:
        pool.tail = left
    return left


def replay(events: list[tuple[int, int]], expandable_segments: bool = False) -> ReplayResult:
    """``events``: ``(+nbytes, key)`` allocations and ``(-nbytes, key)`` frees, in order."""
    model = AllocatorModel(expandable_segments)
    for nbytes, key in events:
        if nbytes >= 0:
            model.malloc(key, nbytes)
        else:
            model.free(key)
    return ReplayResult(model.allocated_peak, model.needed_peak)
