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

Profiles are traced without autograd, so the executor's storage checks (a dense layout, a storage
nothing else holds, no autograd watching) hold for every buffer the rulebook offers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .rules import ProgramRules
from .schema import GpuProfile, ModelProfile


def roofline_seconds(flops: int, bytes_moved: int, gpu: GpuProfile, dtype: str) -> float:
    """Latency of work that is not sliced (a whole stage): compute + memory traffic at derated peaks."""
    tflops = gpu.fp32_tflops if dtype == "fp32" else gpu.fp16_tensor_tflops
    return flops / (tflops * 1e12 * COMPUTE_EFFICIENCY) + bytes_moved / (
        gpu.memory_bandwidth_gbps * 1e9 * BANDWIDTH_EFFICIENCY
    )


# Uncalibrated latency constants: fractions of peak rates reached, and host cost per kernel launch.
COMPUTE_EFFICIENCY = 0.6
BANDWIDTH_EFFICIENCY = 0.75
LAUNCH_SECONDS = 8e-6


@dataclass(frozen=True)
class Segment:
    start: int
    stop: int  # inclusive
    k: int


@dataclass(frozen=True)
class SegmentCost:
    activation_bytes: int  # peak live + transient while the segment runs
    live_bytes: int  # full-size values held at that peak
    transient_bytes: int  # slice intermediates at that peak
    peak_unit: int  # index of the unit where the peak occurs
    needed_bytes: int  # activation_bytes x allocator factor
    seconds: float


class CostModel:
    """Segment costs for one profile on one GPU."""

    def __init__(self, profile: ModelProfile, gpu: GpuProfile, allocator: str = "expandable_segments"):
        self.profile = profile
        self.gpu = gpu
        self.allocator = allocator
        self.units = profile.units
        self.n = len(self.units)
        self.index = {u.name: i for i, u in enumerate(self.units)}
        fp32 = profile.shape.dtype == "fp32"
        tflops = gpu.fp32_tflops if fp32 else gpu.fp16_tensor_tflops
        self.flops_per_s = tflops * 1e12 * COMPUTE_EFFICIENCY
        self.bytes_per_s = gpu.memory_bandwidth_gbps * 1e9 * BANDWIDTH_EFFICIENCY

    # -- static structure ----------------------------------------------------------------------
    @cached_property
    def rules(self) -> ProgramRules:
        return ProgramRules.of(self.units, self.profile.result)

    @property
    def producer(self) -> dict[str, int]:
        return self.rules.producer

    @property
    def last_use(self) -> dict[str, int]:
        return self.rules.last_use

    @cached_property
    def live_in(self) -> list[int]:
        """Bytes of program-made values alive when unit ``a`` starts (read at ``a`` or later)."""
        size = {u.name: u.output_bytes for u in self.units}
        return [self.profile.globals_bytes + sum(size[v] for v in self.rules.made_before(a)) for a in range(self.n)]

    def ks(self, start: int, stop: int) -> list[int]:
        """Slice counts profiled for every unit of ``[start, stop]``."""
        common = set(self.units[start].scratch)
        for unit in self.units[start + 1 : stop + 1]:
            common &= set(unit.scratch)
        return sorted(common)

    # -- one segment -----------------------------------------------------------------------------
    def cost(self, seg: Segment) -> SegmentCost:
        """Memory and latency of ``seg`` (memoised: a segment's cost never depends on the budget)."""
        cache = self.__dict__.setdefault("_costs", {})
        if seg not in cache:
            cache[seg] = self._cost(seg)
        return cache[seg]

    def _cost(self, seg: Segment) -> SegmentCost:
        units = self.units[seg.start : seg.stop + 1]
        entry = self.live_in[seg.start]
        first = units[0]
        slices = min(seg.k, first.axis_length) if first.axis else 1
        if slices <= 1:
            scratch = first.scratch[seg.k]
            act = entry + scratch
            return self._finish(act, entry, scratch, seg.start, seg, 1)

        length = first.axis_length
        big = -(-length // seg.k)  # the first slice is the largest (split_bounds: the first N % k are)...
        small = big if length % seg.k != 1 else length // seg.k  # ...and the largest of the later ones
        rules = self.rules.segment(seg.start, seg.stop)
        kinds = rules.buffers(self._same_shape)
        buffer = [unit.output_bytes if kind == "new" else 0 for unit, kind in zip(units, kinds, strict=True)]
        best = None
        for i, unit in enumerate(units):
            j = seg.start + i
            held = sum(self.units[h].output_bytes for h in rules.held_at(j))  # full size
            scratch = unit.scratch[seg.k]
            before = entry + sum(buffer[:i])
            states = [
                # first slice: earlier units' buffers exist, this unit computes...
                (before, held * big // length + scratch),
                # ...then allocates its own buffer while its output piece is alive;
                (before + buffer[i], held * big // length + unit.output_bytes * big // length),
                # later slices: every buffer exists, slices are `small` (scratch scales with the slice).
                (entry + sum(buffer), held * small // length + scratch * small // big),
            ]
            for live, transient in states:
                if best is None or live + transient > best[0]:
                    best = (live + transient, live, transient, j)
        act, live, transient, j = best
        return self._finish(act, live, transient, j, seg, slices)

    def _same_shape(self, j: int, name: str) -> bool:
        """What the profile can tell of the executor's reuse check: the input has the output's shape."""
        return self.units[self.producer[name]].output_shape == self.units[j].output_shape

    def _finish(self, act: int, live: int, transient: int, j: int, seg: Segment, slices: int) -> SegmentCost:
        factor = self.allocator_factor(seg.k)
        return SegmentCost(act, live, transient, j, int(act * factor), self.seconds(seg, slices))

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
        total = 0.0
        rules = self.rules.segment(seg.start, seg.stop)
        for i in range(seg.start, seg.stop + 1):
            unit = self.units[i]
            total += unit.flops / self.flops_per_s + unit.bytes_moved / self.bytes_per_s
            total += slices * unit.kernels * LAUNCH_SECONDS
            if slices > 1:
                if rules.escapes(i):
                    total += 2 * unit.output_bytes / self.bytes_per_s  # writing slices into the buffer
                if unit.needs_input_stats:
                    total += 3 * self._input_bytes(unit) / self.bytes_per_s  # statistics pass
        return total

    def _input_bytes(self, unit) -> int:
        name = unit.inputs[0]
        p = self.producer.get(name)
        return self.units[p].output_bytes if p is not None else unit.output_bytes

    # -- candidates ----------------------------------------------------------------------------
    def segments(self, max_group: int = 8) -> list[Segment]:
        """Every segment a plan may use: single units at each profiled k, and groups (k > 1)."""
        key = ("_segments", max_group)
        if key in self.__dict__:
            return self.__dict__[key]
        out = []
        for a, unit in enumerate(self.units):
            if unit.axis is None:
                out.append(Segment(a, a, 1))
                continue
            b = a
            while b < self.n and b - a < max_group:
                if b > a and (self.units[b].axis != unit.axis or self.units[b].needs_input_stats):
                    break
                if self.units[b].axis_length != unit.axis_length:
                    break
                for k in self.ks(a, b):
                    if b == a or k > 1:
                        out.append(Segment(a, b, k))
                b += 1
        self.__dict__[key] = out
        return out
