"""Memory and latency of one *segment* of a plan, from a ModelProfile alone.

A plan cuts the units into segments: a group (consecutive units of one axis sharing a slice count
k) or a single unit. Because every value that crosses a segment boundary is materialised at full
size, the memory of a segment depends only on the segment itself — never on how the rest of the
model is cut. That makes the planning problem a shortest path over segments and keeps this model
exact with respect to the executor (``vramplan.runtime.executor``): both take what is alive
when, and which buffer each value is written into, from one rulebook (:mod:`.rules`):

- values alive when the segment starts stay alive until it ends;
- a value read after the segment gets a full buffer, unless it can take over a dying input of its
  own unit (same shape, made by the program before the segment, last read by this unit);
- values made and consumed inside the segment exist one slice at a time;
- with one slice (k=1) a unit's output is its computation's own result.

Three choices change a segment's cost without changing the slicing (see the team contract in
``docs/design.md``): **placement** (``host``: values kept in host memory between segments, never
on the device at a segment's start, staged slice by slice into the units that read them, PCIe time
not overlapped), **weight streaming** (``streamed``: blocks whose weights are on the device only
while a segment touches them, plus the next streamed block prefetched) and **depth** (slices in
flight at once). A statistics unit may sit inside a group whose units make its input: its
statistics then come from a recompute pass (the units it depends on run once more, slice by slice).

Profiles are traced without autograd, so the executor's storage checks (a dense layout, a storage
nothing else holds, no autograd watching) hold for every buffer the rulebook offers.
"""

from __future__ import annotations

import bisect
import copy
import math
from dataclasses import dataclass, replace
from functools import cached_property

from .rules import ProgramRules, SegmentRules
from .schema import GpuProfile, LatencyConstants, ModelProfile


def roofline_seconds(flops: int, bytes_moved: int, gpu: GpuProfile, dtype: str) -> float:
    """Latency of work that is not sliced (a whole stage): compute + memory traffic at derated peaks
    (the GPU's own constants when it has them, see :func:`latency_constants`)."""
    c = latency_constants(gpu)
    return flops / compute_rate(gpu, dtype, c) + bytes_moved / memory_rate(gpu, c)


# Uncalibrated latency constants: fractions of peak rates reached, and host cost per kernel launch.
# Defaults: a GPU profile with ``latency`` (fitted by bench/gpu_check.py) uses its own.
COMPUTE_EFFICIENCY = 0.6
BANDWIDTH_EFFICIENCY = 0.75
LAUNCH_SECONDS = 8e-6


def latency_constants(gpu: GpuProfile) -> LatencyConstants:
    """The latency constants of ``gpu``: its fitted ones (``GpuProfile.latency``), else the defaults above."""
    if gpu.latency is not None:
        return gpu.latency
    return LatencyConstants(compute_efficiency=COMPUTE_EFFICIENCY, bandwidth_efficiency=BANDWIDTH_EFFICIENCY,
                            launch_seconds=LAUNCH_SECONDS)


def compute_rate(gpu: GpuProfile, dtype: str, constants: LatencyConstants | None = None) -> float:
    """FLOP/s reached (infinite when the constants drop the compute term)."""
    c = constants or latency_constants(gpu)
    tflops = gpu.fp32_tflops if dtype == "fp32" else gpu.fp16_tensor_tflops
    return math.inf if c.compute_efficiency is None else tflops * 1e12 * c.compute_efficiency


def memory_rate(gpu: GpuProfile, constants: LatencyConstants | None = None) -> float:
    """Bytes/s reached by memory-bound work (infinite when the constants drop the memory term)."""
    c = constants or latency_constants(gpu)
    return math.inf if c.bandwidth_efficiency is None else gpu.memory_bandwidth_gbps * 1e9 * c.bandwidth_efficiency


# Host-link rate of pageable (not pinned) host memory as a fraction of the pinned rate in
# ``GpuProfile.pcie_gbps``: the copy goes through a driver staging buffer. An estimate, not measured
# here: NVIDIA's "How to Optimize Data Transfers in CUDA C/C++" (Harris, 2012) shows pageable
# transfers at roughly half to 85% of pinned ones depending on the machine; we take the low end,
# since the fallback is used where pinning failed (memory-limited containers).
PAGEABLE_FRACTION = 0.5
# Slices in flight (Group.depth) offered for groups of at least MIN_DEPTH_K slices.
DEPTHS = (2, 4)
MIN_DEPTH_K = 4

EMPTY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Segment:
    start: int
    stop: int  # inclusive
    k: int
    depth: int = 1  # slices in flight at once (a wave); 1 = one after another


@dataclass(frozen=True)
class SegmentCost:
    activation_bytes: int  # peak live + transient (+ streamed weights present) while the segment runs
    live_bytes: int  # full-size values held at that peak
    transient_bytes: int  # slice intermediates at that peak
    peak_unit: int  # index of the unit where the peak occurs
    needed_bytes: int  # activations x allocator factor, + streamed weights present
    seconds: float  # host-link time of placed values included
    streamed_bytes: int = 0  # weights of streamed blocks on the device while the segment runs
    transfer_s: float = 0.0  # host-link seconds of placed values (part of ``seconds``, not overlapped)
    recompute: tuple[int, ...] = ()  # statistics units whose input is recomputed in a pre-pass


class Shared:
    """What a cost model computes that does not depend on the GPU, shared by every cost model of the same
    profile and allocator in this process (a fleet plans one profile on many GPU types): the rulebook per
    placement, each segment's memory and the recipe of its seconds (which units' roofline times and
    launches, which bytes over memory and the host link, in the order they are added), and floors and
    minimax peaks of placements. A GPU's seconds replay the recipe with its rates: the same floating-point
    operations in the same order as computing them afresh, so the numbers are identical."""

    def __init__(self):
        self.rules_cache: dict[frozenset[str], ProgramRules] = {}
        self.relevant: dict[tuple[int, int], frozenset[str]] = {}
        self.touched: dict[tuple[int, int], tuple[frozenset[str], int]] = {}
        self.memory: dict[tuple, tuple] = {}  # (segment, relevant placement) -> memory and seconds recipe
        self.tables: dict[tuple, object] = {}  # memory tables and minimax peaks (planner.solve)


_SHARED: dict[tuple[str, str], Shared] = {}
SHARED_KEPT = 16  # profiles (x allocator) whose GPU-independent costs this process keeps


def shared_for(profile: ModelProfile, allocator: str) -> Shared:
    """The :class:`Shared` store of ``profile`` (by content) and ``allocator`` in this process."""
    key = (profile.model_dump_json(), allocator)
    found = _SHARED.get(key)
    if found is None:
        if len(_SHARED) >= SHARED_KEPT:
            _SHARED.pop(next(iter(_SHARED)))
        found = _SHARED[key] = Shared()
    else:  # most recently used last: evicted last
        _SHARED[key] = _SHARED.pop(key)
    return found


class CostModel:
    """Segment costs for one profile on one GPU, with the GPU's latency constants (its fitted
    ``GpuProfile.latency``, else the module defaults).

    ``pinned=False`` prices host-link copies at the pageable rate (``PAGEABLE_FRACTION``).
    Costs are memoised per (segment, placement relevant to it); streaming is added on top.
    """

    def __init__(self, profile: ModelProfile, gpu: GpuProfile, allocator: str = "expandable_segments", *,
                 pinned: bool = True):
        self.profile = profile
        self.gpu = gpu
        self.allocator = allocator
        self.pinned = pinned
        self.units = profile.units
        self.n = len(self.units)
        self.index = {u.name: i for i, u in enumerate(self.units)}
        self.constants = constants = latency_constants(gpu)
        self.flops_per_s = compute_rate(gpu, profile.shape.dtype, constants)
        self.bytes_per_s = memory_rate(gpu, constants)
        self.launch_seconds = constants.launch_seconds
        self.link_bytes_per_s = gpu.pcie_gbps * 1e9 * constants.link_efficiency * (1.0 if pinned else PAGEABLE_FRACTION)
        self.size = {u.name: u.output_bytes for u in self.units}
        self.shared = shared_for(profile, allocator)
        self._costs: dict[tuple, SegmentCost] = {}  # (segment, relevant placement) -> its cost on this GPU
        # a segment's recipe terms do not depend on the placement (only its host-link bytes do): their sum
        # on this GPU, per segment (and ("rows", segment)), is replayed once
        self._term_seconds: dict = {}
        self._segment_lists: dict[int, list[Segment]] = {}

    # -- static structure ----------------------------------------------------------------------
    @cached_property
    def rules(self) -> ProgramRules:
        return ProgramRules.of(self.units, self.profile.result)

    def rules_for(self, host: frozenset[str]) -> ProgramRules:
        """The rulebook with ``host`` placed in host memory (memoised per placement)."""
        if not host:
            return self.rules
        cache = self.shared.rules_cache
        found = cache.get(host)
        if found is None:
            if len(cache) > 4096:
                cache.clear()
            # ``rules.with_host(host)`` without re-deriving producers and last uses (placement changes neither)
            found = cache[host] = copy.copy(self.rules)
            object.__setattr__(found, "host", host)
        return found

    @property
    def producer(self) -> dict[str, int]:
        return self.rules.producer

    @property
    def last_use(self) -> dict[str, int]:
        return self.rules.last_use

    @cached_property
    def live_in(self) -> list[int]:
        """Bytes of program-made values alive when unit ``a`` starts (read at ``a`` or later), none placed."""
        size = self.size
        return [self.profile.globals_bytes + sum(size[v] for v in self.rules.made_before(a)) for a in range(self.n)]

    def ks(self, start: int, stop: int) -> list[int]:
        """Slice counts profiled for every unit of ``[start, stop]`` (a rows group: those of its last
        unit, whose output rows it splits; the others' scratch is scaled by slab rows)."""
        if stop > start and self.units[start].axis == "rows":
            return sorted(self.units[stop].scratch)
        common = set(self.units[start].scratch)
        for unit in self.units[start + 1 : stop + 1]:
            common &= set(unit.scratch)
        return sorted(common)

    # -- placement and streaming: what may move ---------------------------------------------------
    @cached_property
    def placeable(self) -> tuple[str, ...]:
        """Values that may live in host memory: made by a unit, read by a later one, not the result."""
        return tuple(
            u.name for i, u in enumerate(self.units)
            if u.name != self.profile.result and u.output_bytes > 0 and self.last_use.get(u.name, i) > i
        )

    def relevant(self, seg: Segment) -> frozenset[str]:
        """Values whose placement can change ``seg``'s cost: alive at its start, or made in it."""
        cache = self.shared.relevant
        key = (seg.start, seg.stop)
        if key not in cache:
            cache[key] = frozenset(self.rules.made_before(seg.start)) | frozenset(
                u.name for u in self.units[seg.start : seg.stop + 1]
            )
        return cache[key]

    @cached_property
    def block_order(self) -> tuple[str, ...]:
        """Blocks in execution order (first use)."""
        return tuple(dict.fromkeys(self.unit_blocks))

    @cached_property
    def unit_blocks(self) -> tuple[str, ...]:
        """Each unit's streaming block: the longest ``block_weights`` name that is the unit's name or a dotted
        prefix of it within its ``block`` (an adapter's finer streaming units, e.g. ``up_blocks.0.resnets.1``),
        else its ``block``."""
        out = []
        for u in self.units:
            inside = [b for b in self.profile.block_weights if (u.name == b or u.name.startswith(b + "."))
                      and (b == u.block or b.startswith(u.block + "."))]
            out.append(max(inside, key=len) if inside else u.block)
        return tuple(out)

    @cached_property
    def streamable(self) -> tuple[str, ...]:
        """Blocks whose weights may be streamed (listed in the profile's ``block_weights``), in order."""
        weights = self.profile.block_weights
        return tuple(b for b in self.block_order if weights.get(b, 0) > 0)

    @cached_property
    def present_weights(self) -> dict[str, int]:
        """Device bytes of each streamable block while it is present: its weights, or for a gathered
        table (``block_gathered``) only the rows a call gathers, which are also all it copies in."""
        return {**self.profile.block_weights, **self.profile.block_gathered}

    def streamed_weight_bytes(self, streamed: frozenset[str]) -> int:
        """Weights that leave the device when ``streamed`` blocks are streamed."""
        return sum(self.profile.block_weights.get(b, 0) for b in streamed)

    def _touched(self, start: int, stop: int) -> tuple[frozenset[str], int]:
        cache = self.shared.touched
        found = cache.get((start, stop))
        if found is None:
            blocks = frozenset(self.unit_blocks[start : stop + 1])
            order = self._block_index
            found = cache[(start, stop)] = (blocks, max(order[b] for b in blocks))
        return found

    def present_blocks(self, seg: Segment, streamed: frozenset[str]) -> list[str]:
        """Streamed blocks on the device while ``seg`` runs: those it touches, and the next streamed
        block after the last block it touches (prefetched; a gathered table is never prefetched: its
        unit copies its rows, so the next block copied in is the one after it)."""
        if not streamed:
            return []
        out = [b for b in self._touched_in_order(seg.start, seg.stop) if b in streamed]
        nxt = self._next_streamed(streamed, self._touched(seg.start, seg.stop)[1])
        if nxt is not None:
            out.append(nxt)
        return out

    def present_bytes(self, seg: Segment, streamed: frozenset[str]) -> int:
        weights = self.present_weights
        return sum(weights.get(b, 0) for b in self.present_blocks(seg, streamed))

    def _touched_in_order(self, start: int, stop: int) -> tuple[str, ...]:
        """The blocks units ``start..stop`` touch, in block order (:meth:`_touched`'s set, ordered)."""
        cache = self.__dict__.setdefault("_touched_order", {})
        found = cache.get((start, stop))
        if found is None:
            touched = self._touched(start, stop)[0]
            found = cache[(start, stop)] = tuple(b for b in self.block_order if b in touched)
        return found

    def _next_streamed(self, streamed: frozenset[str], last: int) -> str | None:
        """The first streamed block after block index ``last`` that is prefetched (not a gathered table)."""
        cache = self.__dict__.setdefault("_streamed_positions", {})
        positions = cache.get(streamed)
        if positions is None:
            if len(cache) > 4096:
                cache.clear()
            order, gathered = self._block_index, self.profile.block_gathered
            positions = cache[streamed] = sorted(order[b] for b in streamed if b in order and b not in gathered)
        i = bisect.bisect_right(positions, last)
        return self.block_order[positions[i]] if i < len(positions) else None

    @cached_property
    def _block_index(self) -> dict[str, int]:
        return {b: i for i, b in enumerate(self.block_order)}

    @cached_property
    def unit_seconds(self) -> list[float]:
        """Roofline time of each unit, unsliced (no launches): the compute a weight copy can hide behind."""
        return [u.flops / self.flops_per_s + u.bytes_moved / self.bytes_per_s for u in self.units]

    def streaming_seconds(self, streamed: frozenset[str]) -> tuple[float, float]:
        """(transfer, exposed) seconds per call of streaming ``streamed``: every streamed block is copied
        in once per call, on one copy stream in block order. Block ``b_i`` is prefetched when the
        computation reaches the previous streamed block ``b_(i-1)`` (the call's start for the first)
        and is needed at its own first unit; the computation waits for what is not done by then. A
        gathered table's rows are copied by its unit on the compute stream: all exposed."""
        if not streamed:
            return 0.0, 0.0
        cache = self.__dict__.setdefault("_streaming_cache", {})
        if streamed in cache:
            return cache[streamed]
        first, clock = self._block_clock
        weights = self.present_weights
        index = self._block_index
        blocks = sorted((b for b in streamed if b in index), key=index.__getitem__)  # in block order
        stall = copy_free = total = 0.0
        gathered = self.profile.block_gathered
        for b in [b for b in blocks if b in gathered]:  # copied by their unit, on the compute stream: exposed
            seconds = weights.get(b, 0) / self.link_bytes_per_s
            total += seconds
            stall += seconds
        blocks = [b for b in blocks if b not in gathered]
        for i, b in enumerate(blocks):
            issue = clock[first[blocks[i - 1]]] + stall if i else 0.0
            seconds = weights.get(b, 0) / self.link_bytes_per_s
            total += seconds
            copy_free = max(issue, copy_free) + seconds
            need = clock[first[b]] + stall
            if copy_free > need:
                stall += copy_free - need
        cache[streamed] = (total, stall)
        return cache[streamed]

    @cached_property
    def _block_clock(self) -> tuple[dict[str, int], list[float]]:
        """Each block's first unit, and the compute clock at each unit's start (:meth:`streaming_seconds`)."""
        first: dict[str, int] = {}
        for i, b in enumerate(self.unit_blocks):
            first.setdefault(b, i)
        clock = [0.0]
        for t in self.unit_seconds:
            clock.append(clock[-1] + t)
        return first, clock

    # -- one segment -----------------------------------------------------------------------------
    def cost(self, seg: Segment, host: frozenset[str] = EMPTY, streamed: frozenset[str] = EMPTY) -> SegmentCost:
        """Memory and latency of ``seg`` with values ``host`` placed in host memory and blocks
        ``streamed`` (memoised: a segment's cost never depends on the budget)."""
        rel = host & self.relevant(seg) if host else EMPTY
        key = (seg, rel)
        found = self._costs.get(key)
        if found is None:
            found = self._costs[key] = self._cost(seg, rel)
        if not streamed:
            return found
        extra = self.present_bytes(seg, streamed)
        if not extra:
            return found
        return replace(found, activation_bytes=found.activation_bytes + extra, needed_bytes=found.needed_bytes + extra,
                       streamed_bytes=extra)

    def term_seconds(self, seg: Segment) -> float:
        """``seg``'s seconds without host-link time: its recipe's terms summed at this GPU's rates, the same
        for every placement (``cost(seg, host).seconds`` adds the placed values' link time to it), so a
        lower bound of its seconds under any placement (:func:`.placement._slower_unplaced`)."""
        first = self.units[seg.start]
        key = ("rows", seg) if first.axis == "rows" and seg.k > 1 and self.units[seg.stop].axis_length > 1 else seg
        found = self._term_seconds.get(key)
        if found is None:
            self.cost(seg)
            found = self._term_seconds[key]
        return found

    def needed(self, seg: Segment, host: frozenset[str] = EMPTY) -> int:
        """``cost(seg, host).needed_bytes`` (nothing streamed) without pricing its seconds on this GPU:
        memory is the same on every GPU (:class:`Shared`)."""
        rel = host & self.relevant(seg) if host else EMPTY
        first = self.units[seg.start]
        if first.axis == "rows" and seg.k > 1 and self.units[seg.stop].axis_length > 1:
            found = self.shared.memory.get(("rows", seg, rel))
            return found[0][4] if found is not None else self.cost(seg, rel).needed_bytes
        key = (seg, rel)
        found = self.shared.memory.get(key)
        if found is None:
            found = self.shared.memory[key] = self._memory(seg, rel)
        return found[4]

    def _cost(self, seg: Segment, host: frozenset[str] = EMPTY) -> SegmentCost:
        first = self.units[seg.start]
        if first.axis == "rows" and seg.k > 1 and self.units[seg.stop].axis_length > 1:  # slabs with halos
            return self._rows_cost(seg, host)
        key = (seg, host)
        found = self.shared.memory.get(key)
        if found is None:
            found = self.shared.memory[key] = self._memory(seg, host)
        act, live, transient, j, needed, recompute, terms, link = found
        total = self._term_seconds.get(seg)
        if total is None:
            total = self._term_seconds[seg] = self._replay(terms, 0.0)[0]
        transfer = link / self.link_bytes_per_s  # as self._replay(terms, link), the terms summed once
        return SegmentCost(act, live, transient, j, needed, total + transfer, 0, transfer, recompute)

    def _rows_cost(self, seg: Segment, host: frozenset[str]) -> SegmentCost:
        """A rows group's cost (:mod:`.rows_cost`): its memory and the recipe of its seconds computed once
        per profile (:class:`Shared`), its seconds replayed at this GPU's rates."""
        from . import rows_cost as rc

        key = ("rows", seg, host)
        found = self.shared.memory.get(key)
        if found is None:
            core = host & self._core(seg)
            if len(core) < len(host):  # the others only lower the entry: shift the core placement's states
                if ("rows", seg, core) not in self.shared.memory:
                    self._rows_cost(seg, core)
                memory, terms, link, recompute = self.shared.memory[("rows", seg, core)]
                act, live, transient, j, _ = memory
                d = self._placed_before(host - core)
                memory = (act - d, live - d, transient, j, int((act - d) * self.allocator_factor(seg.k)))
                found = (memory, terms, link, recompute)
            else:
                rules = self.rules_for(host)
                found = rc.rows_memory(self, seg, rules.segment(seg.start, seg.stop), self._entry(seg, host, rules))
            self.shared.memory[key] = found
        memory, terms, link, recompute = found
        total = self._term_seconds.get(("rows", seg))
        if total is None:
            total = self._term_seconds[("rows", seg)] = rc.replay(self, terms, 0.0)[0]
        transfer = link / self.link_bytes_per_s  # as rc.replay(self, terms, link), the terms summed once
        return SegmentCost(*memory, total + transfer, 0, transfer, recompute)

    def _entry(self, seg: Segment, host: frozenset[str], rules: ProgramRules) -> int:
        """Bytes on the device when ``seg`` starts: ``live_in`` less the placed values made before it and
        alive then (the values of ``made_before``; placement changes neither producers nor last uses)."""
        if not host:
            return self.live_in[seg.start]
        size = self.size
        return self.live_in[seg.start] - sum(size[v] for v in host & self._made_before_set(seg.start))

    def _made_before_set(self, start: int) -> frozenset[str]:
        cache = self.__dict__.setdefault("_made_before", {})
        found = cache.get(start)
        if found is None:
            found = cache[start] = frozenset(self.rules.made_before(start))
        return found

    def _core(self, seg: Segment) -> frozenset[str]:
        """Of :meth:`relevant`, the values whose placement changes more than ``seg``'s entry bytes: those
        its units read from before it, and their outputs. A placed value alive at its start that none of
        its units reads only lowers every state by its size (the same peak state, the same recipe)."""
        cache = self.__dict__.setdefault("_cores", {})
        key = (seg.start, seg.stop)
        found = cache.get(key)
        if found is None:
            units = self.units[seg.start : seg.stop + 1]
            producer = self.producer
            found = cache[key] = frozenset(
                v for u in units for v in u.inputs if producer.get(v, seg.start) < seg.start
            ) | frozenset(u.name for u in units)
        return found

    def _placed_before(self, names: frozenset[str]) -> int:
        """Bytes of placed values ``names`` (made before a segment, alive at its start, not read by it)."""
        size = self.size
        return sum(size[v] for v in names)

    def _memory(self, seg: Segment, host: frozenset[str]) -> tuple:
        """``(activation, live, transient, peak unit, needed, recompute, seconds recipe, link bytes)`` of a
        segment that is not a rows group: nothing in it depends on the GPU (:class:`Shared`)."""
        if host:
            core = host & self._core(seg)
            if len(core) < len(host):  # the others only lower the entry: shift the core placement's states
                base = self.shared.memory.get((seg, core))
                if base is None:
                    base = self.shared.memory[(seg, core)] = self._memory(seg, core)
                act, live, transient, j, _, recompute, terms, link = base
                d = self._placed_before(host - core)
                return (act - d, live - d, transient, j, int((act - d) * self.allocator_factor(seg.k)), recompute,
                        terms, link)
        units = self.units[seg.start : seg.stop + 1]
        rules = self.rules_for(host)
        seg_rules = rules.segment(seg.start, seg.stop)
        size = self.size
        entry = self._entry(seg, host, rules)
        first = units[0]
        slices = min(seg.k, first.axis_length) if first.axis else 1
        if slices <= 1:
            scratch = first.scratch[seg.k]
            # whole host inputs, during the call; a unit that stages its input itself (``stage_inside``: the Wan
            # VAE decode's up levels, run by the rows executor) copies a frame at a time, in its profiled scratch
            staged = 0 if first.stage_inside else sum(size[v] for v in seg_rules.staged(seg.start))
            act = entry + scratch + staged
            return self._finish(act, entry, scratch + staged, seg.start, seg, 1, seg_rules)

        length = first.axis_length
        base, extra = divmod(length, slices)  # split_bounds: the first length % slices are one larger
        sizes = [base + 1] * extra + [base] * (slices - extra)
        big = sizes[0]
        depth = min(seg.depth, slices)
        # The first wave (buffers appear as its units run) and the largest later one (every buffer exists).
        waves = [sizes[:depth]] + ([sizes[depth : 2 * depth]] if slices > depth else [])
        kinds = seg_rules.buffers(self._same_shape)
        buffer = [unit.output_bytes if kind == "new" else 0 for unit, kind in zip(units, kinds, strict=True)]
        best = None
        for i, unit in enumerate(units):
            j = seg.start + i
            # slices of earlier units alive while this one runs: all of the wave's when a later unit reads
            # them, else only those of slices it has not reached yet (released per slice once it has read them)
            held = [self.units[h].name for h in seg_rules.held_at(j)]
            held_long = sum(size[v] for v in held if seg_rules.local_last(v) > j)
            held_dying = sum(size[v] for v in held if seg_rules.local_last(v) == j)
            # this unit's pieces of earlier slices of the wave, when a later unit of the segment reads them
            kept = unit.output_bytes if seg_rules.local_last(unit.name) > j else 0
            whole = seg_rules.staged_whole(j)  # host inputs read whole: staged in full for every slice
            staged = sum(size[v] for v in seg_rules.staged(j) if v not in whole)  # one staged slice during the call
            staged_whole = sum(size[v] for v in whole)
            scratch = unit.scratch[seg.k]
            before = entry + sum(buffer[:i])
            states = [
                # first slice: earlier units' buffers exist; it allocates its own while its output piece is alive
                (before + buffer[i], (held_long + held_dying) * sum(waves[0]) // length
                 + unit.output_bytes * big // length),
            ]
            for w, wave in enumerate(waves):
                total = sum(wave)
                for m, s in enumerate(wave):
                    # slice m of the wave computes: every buffer of the first wave's earlier units (its own
                    # after its first slice; all of them in later waves); scratch scales with the slice
                    live = entry + sum(buffer) if w else before + (buffer[i] if m else 0)
                    reached = sum(wave[:m])
                    transient = (held_long * total + held_dying * (total - reached) + kept * reached
                                 + staged * s) // length + scratch * s // big + staged_whole
                    states.append((live, transient))
            for live, transient in states:
                if best is None or live + transient > best[0]:
                    best = (live + transient, live, transient, j)
        act, live, transient, j = best
        return self._finish(act, live, transient, j, seg, slices, seg_rules)

    def _same_shape(self, j: int, name: str) -> bool:
        """What the profile can tell of the executor's reuse check: the input has the output's shape."""
        return self.units[self.producer[name]].output_shape == self.units[j].output_shape

    def _finish(self, act: int, live: int, transient: int, j: int, seg: Segment, slices: int,
                seg_rules: SegmentRules) -> tuple:
        factor = self.allocator_factor(seg.k)
        terms, link, recompute = self._recipe(seg, slices, seg_rules)
        return act, live, transient, j, int(act * factor), recompute, terms, link

    def allocator_factor(self, k: int) -> float:
        if self.allocator == "none":
            return 1.0
        table = getattr(self.profile.allocator, self.allocator)
        targets = sorted(table)
        for target in targets:
            if target >= k:
                return table[target]
        return table[targets[-1]]

    def seconds(self, seg: Segment, slices: int) -> float:
        """Latency of ``seg`` with nothing placed (see :meth:`cost` for placed values)."""
        return self._seconds(seg, slices, self.rules.segment(seg.start, seg.stop))[0]

    def _seconds(self, seg: Segment, slices: int, rules: SegmentRules) -> tuple[float, float, tuple[int, ...]]:
        terms, link, recompute = self._recipe(seg, slices, rules)
        return (*self._replay(terms, link), recompute)

    def _recipe(self, seg: Segment, slices: int, rules: SegmentRules) -> tuple[tuple, float, tuple[int, ...]]:
        """A segment's seconds as GPU-independent terms, in the order they add up: ``(unit, slices x
        kernels, depth)`` for a unit's roofline time and launches, ``(bytes,)`` for memory traffic; and
        the bytes over the host link (:meth:`_replay` prices them on this GPU)."""
        terms = []
        link = 0.0  # bytes over the host link
        recompute = []
        size = self.size
        for i in range(seg.start, seg.stop + 1):
            unit = self.units[i]
            terms.append((i, slices * unit.kernels, seg.depth))
            staged = rules.staged(i)
            link += sum(size[v] * (slices if rules.program.reads_whole(i, v) else 1)
                        for v in staged)  # each reading unit stages its own slices (a whole value per slice)
            if slices > 1:
                if rules.escapes(i):
                    terms.append((2 * unit.output_bytes,))  # writing slices into the buffer
                if unit.needs_input_stats:
                    terms.append((3 * self._input_bytes(unit),))  # statistics pass
                    cone = rules.cone(i) if i > seg.start else []
                    if cone:  # the units making its input run once more, slice by slice
                        recompute.append(i)
                        for c in cone:
                            terms.append((c, slices * self.units[c].kernels, seg.depth))
                            link += sum(size[v] for v in rules.staged(c))
                    elif unit.inputs and unit.inputs[0] in staged:
                        link += size[unit.inputs[0]]  # the statistics pass stages it once more
            if rules.on_host(i):
                link += unit.output_bytes  # written to host memory once
        return tuple(terms), link, tuple(recompute)

    def _replay(self, terms: tuple, link: float) -> tuple[float, float]:
        """(seconds, host-link seconds) of a recipe on this GPU: the roofline and launch time of each unit
        term (as :meth:`_unit_time`), memory traffic at the bandwidth, the host link not overlapped."""
        total = 0.0
        unit_seconds, launch, bandwidth = self.unit_seconds, self.launch_seconds, self.bytes_per_s
        for t in terms:
            if len(t) == 3:
                total += unit_seconds[t[0]] + t[1] * launch / t[2]
            else:
                total += t[0] / bandwidth
        transfer = link / self.link_bytes_per_s
        return total + transfer, transfer

    def _unit_time(self, i: int, slices: int, depth: int) -> float:
        unit = self.units[i]
        return self.unit_seconds[i] + slices * unit.kernels * self.launch_seconds / depth

    def _input_bytes(self, unit) -> int:
        name = unit.inputs[0]
        p = self.producer.get(name)
        return self.units[p].output_bytes if p is not None else unit.output_bytes

    # -- candidates ----------------------------------------------------------------------------
    def segments(self, max_group: int = 8) -> list[Segment]:
        """Every segment a plan may use: single units at each profiled k, and groups (k > 1), with
        depth 2 and 4 for groups of at least 4 slices. A statistics unit may sit inside a group: its
        statistics come from the full input when that is made before the group, else from a
        recompute pass."""
        found = self._segment_lists.get(max_group)
        if found is not None:
            return found
        out = []
        for a, unit in enumerate(self.units):
            if unit.axis is None:
                out.append(Segment(a, a, 1))
                continue
            b = a
            while b < self.n and b - a < max_group:
                if b > a and self.units[b].axis != unit.axis:
                    break
                if b > a and self.rules.whole_made_inside(a, b):
                    break  # b reads whole a value this run makes
                if self.units[b].axis_length != unit.axis_length and unit.axis != "rows":
                    break  # a rows group may change resolution (its slabs follow the row maps)
                for k in self.ks(a, b):
                    if b == a or k > 1:
                        out.append(Segment(a, b, k))
                        if b > a and k >= MIN_DEPTH_K and unit.axis != "rows":
                            out += [Segment(a, b, k, d) for d in DEPTHS if d <= k]
                b += 1
        self._segment_lists[max_group] = out
        return out
