"""The memory rulebook: what is alive when, and which buffer a value is written into.

The executor (``vramplan.runtime.executor``) follows these rules and the cost model
(:mod:`.costs`) predicts memory from them: one copy, so the two cannot drift. Everything here
works on value *names* and positions in the program; what only the executor can know (shapes and
dtypes of real tensors, storage identity, whether autograd can see a write) it adds through the
``fits`` callback of :meth:`SegmentRules.reuse`. No torch.

A program is a list of units; unit ``i`` reads named values and writes the value named by its
output. Values not written by any unit are *initial* (the caller's, never written into).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProgramRules:
    """Positions of a whole program: who makes each value and when it is read for the last time.

    ``keep``: values that must survive the call (never reused as a buffer, never released): they
    count as read at the end, like the result.
    """

    inputs: tuple[tuple[str, ...], ...]
    outputs: tuple[str, ...]
    result: str
    keep: frozenset[str] = frozenset()
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
    def of(cls, units: Iterable, result: str, keep: Collection[str] = frozenset()) -> ProgramRules:
        """From anything with ``inputs`` and ``output`` (executor ops) or ``name`` (profile units)."""
        units = list(units)
        return cls(
            tuple(tuple(u.inputs) for u in units),
            tuple(getattr(u, "output", None) or u.name for u in units),
            result,
            frozenset(keep),
        )

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
        made by the program before this segment (full size; never an initial value) and read for
        the last time by ``j`` (each slice of it is read before the same slice is overwritten)."""
        out = []
        for name in self.program.inputs[j]:
            p = self.program.producer.get(name)
            if p is not None and p < self.start and self.program.last_use[name] == j and name not in out:
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
        new buffer, else the name of the input it reuses (with one slice no buffer is made)."""
        taken: set[str] = set()
        out: list[str | None] = []
        for j in range(self.start, self.stop + 1):
            if not self.escapes(j):
                out.append(None)
                continue
            out.append(self.reuse(j, taken, lambda name, j=j: fits(j, name)) or "new")
        return out


def released_after_segment(program: ProgramRules, stop: int, names: Sequence[str]) -> list[str]:
    """Of ``names`` (what exists after a segment ending at ``stop``), those no later unit reads."""
    return [name for name in names if not program.alive(name, stop + 1)]
