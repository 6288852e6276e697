"""Rows with halos: which input rows a unit needs for a range of its output rows (no torch).

A unit sliced along *rows* computes a range of rows of its output (``[..., H, W]``: the height
dimension) from a *slab* of its input rows: its own rows plus the halo its convolutions need. A
unit declares its row map as the chain of its layers along the height, each a :class:`RowStep`
(a convolution: kernel, stride, padding; or a nearest upsampling). From it follow the output
length, the input slab of an output range (walking the chain backwards) and where the local rows
of a slab's result sit in the full output (walking it forwards). Every input of a rows unit has the
same rows (one resolution in, one out).

Exactness: a convolution run on a slab pads the slab's edges with zeros; those rows differ from
the full computation only within the halo, and a slab of an output range is wide enough that the
requested rows never read them. A strided convolution only computes the full grid's rows when the
slab starts on its grid, so slab starts are moved down until every strided layer is aligned.

:func:`plan_segment` gives, for every slice of a rows segment (consecutive rows units, possibly
across resolutions), which rows each unit computes; the executor runs it and the cost model prices
the halo's extra rows from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .rules import split_bounds


@dataclass(frozen=True)
class RowStep:
    """One layer along the height: a convolution (``kernel``, ``stride``, ``pad`` rows before and
    ``pad_end`` after, default ``pad``) or, with ``up`` > 1, a nearest upsampling by ``up``."""

    kernel: int = 1
    stride: int = 1
    pad: int = 0
    pad_end: int | None = None
    up: int = 1
    cost: int = 0  # relative work per output row (a unit that crops after every step: its time model)
    mem: int = 0  # relative bytes per row it holds (input and output; a unit that crops: its memory model)

    @property
    def after(self) -> int:
        return self.pad if self.pad_end is None else self.pad_end

    def out_len(self, n: int) -> int:
        if self.up > 1:
            return n * self.up
        return (n + self.pad + self.after - self.kernel) // self.stride + 1

    def needs(self, s: int, e: int, n_in: int) -> tuple[int, int]:
        """Input rows that output rows ``[s, e)`` read (clipped to the input)."""
        if self.up > 1:
            return s // self.up, min(n_in, -(-e // self.up))
        a = max(0, self.stride * s - self.pad)
        b = min(n_in, self.stride * (e - 1) - self.pad + self.kernel)
        if b <= a:  # rows made of padding only: the slab at that edge, one row
            a, b = (0, min(1, n_in)) if a == 0 else (max(0, n_in - 1), n_in)
        return a, b

    def start(self, a: int) -> int:
        """The full output's row of the first row computed from a slab starting at input row ``a``."""
        return a * self.up if self.up > 1 else a // self.stride

    def aligned(self, a: int) -> bool:
        return self.up > 1 or a % self.stride == 0

    def as_list(self) -> list[int]:
        out = [self.kernel, self.stride, self.pad, self.after, self.up, self.cost]
        return [*out, self.mem] if self.mem else out

    def with_cost(self, cost: int, mem: int = 0) -> RowStep:
        return RowStep(self.kernel, self.stride, self.pad, self.pad_end, self.up, int(cost), int(mem))


CONV3 = RowStep(kernel=3, pad=1)  # a 3x3 convolution, stride 1, padding 1: a halo of one row each side
POINT = RowStep()  # per-row (1x1 convolutions, norms over channels, activations)
UP2 = RowStep(up=2)


@dataclass(frozen=True)
class RowMap:
    """A unit's layers along the height, in execution order."""

    steps: tuple[RowStep, ...] = ()

    @classmethod
    def of(cls, *steps: RowStep) -> RowMap:
        return cls(tuple(steps))

    @classmethod
    def from_list(cls, data: Sequence[Sequence[int]]) -> RowMap:
        return cls(tuple(RowStep(*step) for step in data))

    def as_list(self) -> list[list[int]]:
        return [s.as_list() for s in self.steps]

    def lengths(self, n_in: int) -> list[int]:
        return list(self._lens(n_in))

    def _lens(self, n_in: int) -> tuple[int, ...]:
        """Rows before every step and after the last, for ``n_in`` input rows; memoised per map (the cost
        model asks for the same few lengths hundreds of thousands of times while planning)."""
        cache = self.__dict__.get("_lens_cache")
        if cache is None:
            cache = self.__dict__["_lens_cache"] = {}  # not a field: equality and hashing ignore it
        found = cache.get(n_in)
        if found is None:
            out = [n_in]
            for step in self.steps:
                out.append(step.out_len(out[-1]))
            found = cache[n_in] = tuple(out)
        return found

    def out_len(self, n_in: int) -> int:
        return self._lens(n_in)[-1]

    def start(self, a: int) -> int:
        for step in self.steps:
            a = step.start(a)
        return a

    def _aligned(self, a: int) -> bool:
        for step in self.steps:
            if not step.aligned(a):
                return False
            a = step.start(a)
        return True

    def needs(self, s: int, e: int, n_in: int) -> tuple[int, int]:
        """The input slab ``[a, b)`` from which output rows ``[s, e)`` are computed exactly: every
        step's halo, and ``a`` lowered until every strided step's slab starts on its grid."""
        lens = self._lens(n_in)
        for i in range(len(self.steps) - 1, -1, -1):
            s, e = self.steps[i].needs(s, e, lens[i])
        while s > 0 and not self._aligned(s):
            s -= 1
        return s, e

    def step_slabs(self, s: int, e: int, n_in: int) -> list[tuple[int, int]]:
        """Input rows of every step for output rows ``[s, e)``, when each step keeps only the rows the
        next one reads (a unit that crops after every step): ``[(a_0, b_0), ...]`` in step order."""
        lens = self._lens(n_in)
        out = []
        for i in range(len(self.steps) - 1, -1, -1):
            s, e = self.steps[i].needs(s, e, lens[i])
            out.append((s, e))
        return out[::-1]

    def held_rows(self, s: int, e: int, n_in: int) -> int:
        """Rows weighted by bytes per row (``mem``) that a unit cropping after every step holds for output
        rows ``[s, e)`` (the output rows themselves when no step says its bytes)."""
        if not any(step.mem for step in self.steps):
            return e - s
        slabs = self.step_slabs(s, e, n_in)
        return sum(step.mem * step.out_len(b - a) for step, (a, b) in zip(self.steps, slabs, strict=True))

    def cropped_fraction(self, bounds: Sequence[tuple[int, int]], n_in: int) -> float:
        """Work of computing output rows ``bounds`` (slices) step by step, cropping after every step, as
        a fraction of the unsliced work (steps weighted by their ``cost``, equal when none is given)."""
        lens = self._lens(n_in)
        weights = [s.cost or 1 for s in self.steps]
        whole = sum(w * lens[i + 1] for i, w in enumerate(weights))
        done = 0
        for s, e in bounds:
            for i, (a, b) in enumerate(self.step_slabs(s, e, n_in)):
                done += weights[i] * self.steps[i].out_len(b - a)
        return done / whole if whole else 1.0

    @property
    def radius(self) -> int:
        """Halo rows at the input per side for one output row, roughly (for messages)."""
        a, b = self.needs(8 * 64, 8 * 64 + 1, 1 << 20)
        return max(0, (b - a - 1) // 2)


IDENTITY = RowMap()


def proportional(bounds: Sequence[tuple[int, int]], length: int, total: int) -> list[tuple[int, int]]:
    """``bounds`` (a partition of ``[0, total)``) scaled to a partition of ``[0, length)``."""
    return [(s * length // total, e * length // total) for s, e in bounds]


@dataclass(frozen=True)
class SliceRows:
    """One slice of a rows segment: per unit (in segment order) the output rows it computes
    (``out``; empty when nothing needs it), its input slab (``slab``) and the rows of its output
    that belong to this slice (``own``: written into the full buffer when the output escapes)."""

    out: tuple[tuple[int, int], ...]
    slab: tuple[tuple[int, int], ...]
    own: tuple[tuple[int, int], ...]


def segment_lengths(maps: Sequence[RowMap], first_inputs: Sequence[int | None], in_lens: Sequence[int]) -> list[int]:
    """Output rows of every unit: ``first_inputs[j]`` is the segment position of the unit making unit
    ``j``'s first input (None: made before the segment, ``in_lens[j]`` rows)."""
    out: list[int] = []
    for j, m in enumerate(maps):
        p = first_inputs[j]
        out.append(m.out_len(in_lens[j] if p is None else out[p]))
    return out


def plan_segment(
    maps: Sequence[RowMap],
    readers: Sequence[Sequence[int]],
    first_inputs: Sequence[int | None],
    in_lens: Sequence[int],
    k: int,
) -> list[SliceRows]:
    """Rows of every unit for each of the ``k`` slices of a rows segment.

    ``readers[j]``: segment positions of the units that read unit ``j``'s output. The last unit's
    output rows are split into ``k`` near-equal ranges (larger first); every other output's own rows
    are the same split scaled to its length. A unit computes its own rows and every row a reader's
    slab needs."""
    lens = segment_lengths(maps, first_inputs, in_lens)
    n = len(maps)
    last = lens[-1]
    bounds = split_bounds(last, k)
    k = len(bounds)
    owns = [proportional(bounds, lens[j], last) for j in range(n)]
    inputs_len = [in_lens[j] if first_inputs[j] is None else lens[first_inputs[j]] for j in range(n)]
    out = []
    for i in range(k):
        need: list[tuple[int, int]] = [(0, 0)] * n
        slab: list[tuple[int, int]] = [(0, 0)] * n
        for j in range(n - 1, -1, -1):
            lo, hi = owns[j][i]
            for r in readers[j]:
                a, b = slab[r]
                if b > a:
                    lo, hi = (a, b) if hi <= lo else (min(lo, a), max(hi, b))
            need[j] = (lo, hi)
            slab[j] = maps[j].needs(lo, hi, inputs_len[j]) if hi > lo else (0, 0)
        out.append(SliceRows(tuple(need), tuple(slab), tuple(o[i] for o in owns)))
    return out


def slice_work(maps: Sequence[RowMap], sl: SliceRows, in_lens: Sequence[int], cropped: Sequence[bool]) -> int:
    """Rows a slice computes over its units: a unit's input slab, or, for a unit that crops after every
    step (``cropped``), the sum of its steps' slabs (its high-resolution steps, not its input, set its
    memory)."""
    total = 0
    for j, m in enumerate(maps):
        a, b = sl.slab[j]
        if b <= a:
            continue
        if cropped[j]:
            s, e = sl.out[j]
            total += sum(y - x for x, y in m.step_slabs(s, e, in_lens[j]))
        else:
            total += b - a
    return total


def profiled_slice(maps: Sequence[RowMap], slices: Sequence[SliceRows], in_lens: Sequence[int],
                   cropped: Sequence[bool]) -> int:
    """Index of the slice the profiler runs for a unit's scratch: the one computing the most rows (a
    middle slice, with halos on both sides); the cost model reads the profile against the same slice."""
    return max(range(len(slices)), key=lambda i: slice_work(maps, slices[i], in_lens, cropped))
