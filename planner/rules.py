"""The memory rulebook: what is alive when, and which buffer a value is written into.

The executor (``vramplan.runtime.executor``) follows these rules and the cost model
(:mod:`.costs`) predicts memory from them: one copy, so the two cannot drift. Everything here
works on value *names* and positions in the program; what only the executor can know (shapes and
dtypes of real tensors, storage identity, whether autograd can see a write) it adds through the
``fits`` callback of :meth:`SegmentRules.reuse`. No torch.

A program is a list of units; unit ``i`` reads named values and writes the value named by its
output. Values not written by any unit are *initial* (the caller's, never written into).

Placement: values named in ``ProgramRules.host`` live in host memory between segments. They are
never alive on the device at a segment's start (:meth:`ProgramRules.on_device_before`); an
escaping host output needs no device buffer; a unit that reads a host value made before its
segment *stages* each slice it reads (a device copy alive during that unit's call only:
:meth:`SegmentRules.staged`); buffer reuse needs matching placement (a host output only over a
dying host input, a device output only over a device input).

Whole inputs: a unit may read some inputs *whole* while its output is sliced (self-attention's
keys and values for a chunk of queries). Such a value must exist in full before the unit's segment
(:meth:`ProgramRules.whole_made_inside` names the units that break this), its reader's output never
takes over its buffer, and a host-placed one is staged whole for every slice.

Recompute: a unit that needs statistics over its whole first input may sit inside a segment that
makes that input; its statistics then come from a pass that recomputes, slice by slice, the units
of the segment that input depends on (:meth:`SegmentRules.cone`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProgramRules:
    """Positions of a whole program: who makes each value and when it is read for the last time.

    ``keep``: values that must survive the call (never reused as a buffer, never released): they
    count as read at the end, like the result. ``host``: program-made values placed in host memory
    between segments (see the module docstring).
    """

    inputs: tuple[tuple[str, ...], ...]
    outputs: tuple[str, ...]
    result: str
    keep: frozenset[str] = frozenset()
    host: frozenset[str] = frozenset()
    whole: tuple[frozenset[str], ...] = ()  # per unit: the inputs it reads whole (empty when none)
    producer: dict[str, int] = field(init=False)
    last_use: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        producer: dict[str, int] = {}
        last: dict[str, int] = {}
        for i, (names, out) in enumerate(zip(self.inputs, self.outputs, strict=True)):
            for name in names:
                last[name] = i
            last.setdefault(out, i)
            producer.setdefault(out, i)
        for name in (self.result, *self.keep):
            last[name] = len(self.outputs)
        object.__setattr__(self, "producer", producer)
        object.__setattr__(self, "last_use", last)

    @classmethod
    def of(
        cls, units: Iterable, result: str, keep: Collection[str] = frozenset(), host: Collection[str] = frozenset()
    ) -> ProgramRules:
        """From anything with ``inputs`` and ``output`` (executor ops) or ``name`` (profile units)."""
        units = list(units)
        whole = tuple(frozenset(getattr(u, "whole_inputs", None) or ()) for u in units)
        return cls(
            tuple(tuple(u.inputs) for u in units),
            tuple(getattr(u, "output", None) or u.name for u in units),
            result,
            frozenset(keep),
            frozenset(host),
            whole if any(whole) else (),
        )

    def with_host(self, host: Collection[str]) -> ProgramRules:
        """The same program with ``host`` placed in host memory (the cost model tries placements)."""
        return ProgramRules(self.inputs, self.outputs, self.result, self.keep, frozenset(host), self.whole)

    def reads_whole(self, j: int, name: str) -> bool:
        """Whether unit ``j`` reads ``name`` whole (every slice of ``j`` sees the full value)."""
        return bool(self.whole) and name in self.whole[j]

    def whole_made_inside(self, start: int, stop: int) -> list[int]:
        """Units of ``start..stop`` reading whole a value made by an earlier unit of that range: such a
        range cannot be one segment (the value exists one slice at a time there)."""
        if not self.whole:
            return []
        return [
            j for j in range(start + 1, stop + 1)
            if any(start <= self.producer.get(n, -1) < j for n in self.whole[j])
        ]

    def host_errors(self, host: Collection[str]) -> list[str]:
        """Why each name of ``host`` cannot be placed on host (empty when all can): only values made by
        a unit may be, never the result nor a kept value."""
        errors = []
        for name in sorted(set(host)):
            if name not in self.producer:
                errors.append(f"{name} is not a value made by a unit" + (
                    " (it is an initial value)" if any(name in names for names in self.inputs) else ""))
            elif name == self.result:
                errors.append(f"{name} is the result")
            elif name in self.keep:
                errors.append(f"{name} is kept")
        return errors

    @property
    def n(self) -> int:
        return len(self.outputs)

    def alive(self, name: str, at: int) -> bool:
        """Whether ``name`` is still needed when unit ``at`` starts (values are released after the
        segment of their last read, so this is what a segment starting at ``at`` inherits)."""
        return self.last_use.get(name, -1) >= at

    def made_before(self, start: int) -> list[str]:
        """Program-made values written before unit ``start`` and alive when it starts (full size)."""
        return [out for i, out in enumerate(self.outputs[:start]) if self.producer[out] == i and self.alive(out, start)]

    def on_device_before(self, start: int) -> list[str]:
        """:meth:`made_before` without host-placed values: what a segment starting at ``start`` holds
        on the device from earlier segments (the cost model's ``live_in``)."""
        return [name for name in self.made_before(start) if name not in self.host]

    def segment(self, start: int, stop: int) -> SegmentRules:
        return SegmentRules(self, start, stop)


@dataclass(frozen=True)
class SegmentRules:
    """Units ``start..stop`` (inclusive) run slice by slice end to end.

    - a value read after the segment (or kept) *escapes*: it is written slice by slice into a
      full buffer — a new one, or a dying input's (:meth:`reuse`);
    - a value made and last read inside the segment exists one slice at a time, from its unit
      until its last reader in the segment (:meth:`held_at`);
    - values alive when the segment starts stay alive until it ends.
    """

    program: ProgramRules
    start: int
    stop: int
    _local_last: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        last: dict[str, int] = {}
        for j in range(self.start, self.stop + 1):
            for name in self.program.inputs[j]:
                last[name] = j
        object.__setattr__(self, "_local_last", last)

    def escapes(self, j: int) -> bool:
        return self.program.last_use[self.program.outputs[j]] > self.stop

    def on_host(self, j: int) -> bool:
        """Whether unit ``j``'s output escapes into host memory (then it needs no device buffer: with
        several slices each slice is copied into a host buffer, with one the whole result is)."""
        return self.escapes(j) and self.program.outputs[j] in self.program.host

    def staged_whole(self, j: int) -> list[str]:
        """Of :meth:`staged`, the values ``j`` reads whole: staged in full for every slice."""
        return [n for n in self.staged(j) if self.program.reads_whole(j, n)]

    def staged(self, j: int) -> list[str]:
        """Host values unit ``j`` reads from before this segment: each slice it reads (the whole value
        when unsliced) is copied to the device and alive during ``j``'s call only. Distinct names, in
        input order. Two units reading one host value each stage their own slices."""
        out = []
        for name in self.program.inputs[j]:
            p = self.program.producer.get(name)
            if name in self.program.host and p is not None and p < self.start and name not in out:
                out.append(name)
        return out

    def cone(self, j: int) -> list[int]:
        """Units of this segment before ``j`` that ``j``'s first input depends on, in order (empty when
        that input is made before the segment). For a unit that needs statistics over its whole
        first input this is its recompute pass: per slice (the segment's bounds) these units run
        again, the input's slice feeds the merge of moments, and everything is dropped. Cost: the
        cone's units once more; memory: at most the cone's slices (below the main pass's)."""
        if not self.program.inputs[j]:
            return []
        need = {self.program.inputs[j][0]}
        out = []
        for i in range(j - 1, self.start - 1, -1):
            if self.program.outputs[i] in need:
                out.append(i)
                need.update(self.program.inputs[i])
        return out[::-1]

    def recompute_release_after(self, j: int) -> dict[int, list[str]]:
        """For each unit ``i`` of ``j``'s :meth:`cone`: the cone's slices that die once ``i`` has run in
        the recompute pass (no later cone unit reads them; the last cone unit's output dies after ``j``'s
        statistics have taken it, so it is listed under no unit)."""
        cone = self.cone(j)
        last: dict[str, int] = {}
        for u in cone:
            for name in self.program.inputs[u]:
                last[name] = u
        last[self.program.inputs[j][0]] = j
        outputs = self.program.outputs
        return {i: [outputs[u] for u in cone if u <= i and last.get(outputs[u], -1) <= i] for i in cone}

    def local_last(self, name: str) -> int:
        """Position of the last unit of this segment that reads ``name`` (-1 if none does)."""
        return self._local_last.get(name, -1)

    def held_at(self, j: int) -> list[int]:
        """Units of this segment before ``j`` whose output slices are still alive while ``j`` runs."""
        return [i for i in range(self.start, j) if self.local_last(self.program.outputs[i]) >= j]

    def release_after(self, j: int) -> list[str]:
        """Slices made in this segment that die once unit ``j`` has run."""
        return [
            self.program.outputs[i]
            for i in range(self.start, j + 1)
            if self.local_last(self.program.outputs[i]) <= j
        ]

    def candidates(self, j: int) -> list[str]:
        """Inputs of unit ``j`` whose full buffer its escaping output may take over, by position:
        made by the program before this segment (full size; never an initial value), read for the
        last time by ``j`` (each slice of it is read before the same slice is overwritten: never an
        input ``j`` reads whole), and placed where the output is (host over host, device over device)."""
        out = []
        host = self.program.host
        placed = self.program.outputs[j] in host
        for name in self.program.inputs[j]:
            p = self.program.producer.get(name)
            if (
                p is not None and p < self.start and self.program.last_use[name] == j and name not in out
                and (name in host) == placed and not self.program.reads_whole(j, name)
            ):
                out.append(name)
        return out

    def reuse(self, j: int, taken: set[str], fits: Callable[[str], bool]) -> str | None:
        """The input whose buffer unit ``j``'s escaping output reuses, or None for a new buffer.

        ``fits(name)`` adds what positions cannot tell: same shape (and, at run time, dtype, a dense
        layout, a storage nothing else holds, no autograd watching). ``taken`` collects the inputs
        already reused in this segment.
        """
        for name in self.candidates(j):
            if name not in taken and fits(name):
                taken.add(name)
                return name
        return None

    def buffers(self, fits: Callable[[int, str], bool]) -> list[str | None]:
        """For each unit of the segment: ``None`` if its output needs no full buffer, ``"new"`` for a
        new device buffer, ``"host"`` for a new host buffer (no device bytes), else the name of the
        input it reuses (a host input for a host output: :meth:`on_host`). With one slice no buffer
        is made (a host output is then copied whole)."""
        taken: set[str] = set()
        out: list[str | None] = []
        for j in range(self.start, self.stop + 1):
            if not self.escapes(j):
                out.append(None)
                continue
            new = "host" if self.on_host(j) else "new"
            out.append(self.reuse(j, taken, lambda name, j=j: fits(j, name)) or new)
        return out


def released_after_segment(program: ProgramRules, stop: int, names: Sequence[str]) -> list[str]:
    """Of ``names`` (what exists after a segment ending at ``stop``), those no later unit reads."""
    return [name for name in names if not program.alive(name, stop + 1)]


def split_bounds(length: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous ranges covering ``[0, length)``, sizes differing by at most one (the first
    ``length % k`` one larger): how every axis is sliced, by the executor and the cost model alike."""
    k = max(1, min(k, length))
    base, extra = divmod(length, k)
    bounds, start = [], 0
    for i in range(k):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
