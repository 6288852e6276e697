"""Run a rows segment: every slice computes its rows plus the halo its convolutions need.

The executor (:mod:`.executor`) hands segments along ``rows`` here. Which rows each unit computes
per slice comes from :func:`vramplan.planner.rows.plan_segment` (the cost model prices the same
plan). A slice runs the segment's units in order on input slabs; each unit's result is cropped to
the rows a later unit of the slice reads, or that the slice owns; an escaping output gets its own
rows written into a full buffer (never into an input's buffer: later slices still read the halo).

Statistics over whole frames (GroupNorm): a unit's ``prepare`` gets the non-overlapping own rows of
its first input, one slice at a time — read from the full value, or, when the segment makes that
input, recomputed by the units it depends on (the rulebook's cone) on the same slice's rows.
"""

from __future__ import annotations

import torch

from ..planner.rows import SliceRows, plan_segment, profiled_slice, segment_lengths
from ..planner.rules import SegmentRules
from .memory import unit_label
from .program import SliceCtx, split_bounds

AXIS = "rows"


def _crop(t: torch.Tensor, have: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``t``, whose first row is row ``have`` of the full value."""
    if start - have < 0 or stop - have > t.shape[-2]:
        raise RuntimeError(f"rows slice: rows [{start}, {stop}) are not in a slab starting at {have} "
                           f"with {t.shape[-2]} rows")
    return t.narrow(-2, start - have, stop - start)


class RowsSegment:
    """One rows segment of a run (``run``: the executor's ``_Run``)."""

    def __init__(self, run, seg, rules: SegmentRules):
        self.run, self.seg, self.rules, self.ops = run, seg, rules, seg.ops
        for op in self.ops:
            if op.rows is None:
                raise ValueError(f"{op.name} slices along rows but declares no row map (Op.rows)")
        pos = {op.output: i for i, op in enumerate(self.ops)}
        self.pos = pos
        env = run.env
        first = [pos.get(op.inputs[0]) for op in self.ops]
        in_lens = [env[op.inputs[0]].shape[-2] if f is None else 0 for op, f in zip(self.ops, first, strict=True)]
        readers = [[r for r, other in enumerate(self.ops) if r > j and op.output in other.inputs]
                   for j, op in enumerate(self.ops)]
        maps = [op.rows for op in self.ops]
        self.slices = plan_segment(maps, readers, first, in_lens, seg.k)
        self.lengths = segment_lengths(maps, first, in_lens)  # output rows of each unit
        self.in_lens = [in_lens[j] if f is None else self.lengths[f] for j, f in enumerate(first)]
        self.length = self.lengths[-1]

    def _read(self, name: str, a: int, b: int, local: dict, inside: bool = False) -> torch.Tensor:
        """Rows ``[a, b)`` of ``name``: from this slice's local piece, staged from host (``inside``: left
        on host for the op to stage piece by piece, ``Op.stage_inside``), or a view."""
        if name in local:
            piece, have = local[name]
            return _crop(piece, have, a, b)
        run = self.run
        t = run.env[name].narrow(-2, a, b - a)
        return run.stage(t) if name in run.host and not inside else t

    def _unit(self, j: int, sl: SliceRows, local: dict, prepared) -> tuple[torch.Tensor, int] | None:
        """Unit ``j`` on one slice: its output rows ``sl.out[j]`` (a tensor and its first row)."""
        op = self.ops[j]
        s, e = sl.out[j]
        if e <= s:
            return None
        a, b = sl.slab[j]
        args = [self._read(n, a, b, local, op.stage_inside) for n in op.inputs]
        ctx = SliceCtx(AXIS, s, e, self.lengths[j], self.run.globals, prepared, self.shapes)
        piece = self.run._call(op.fn, ctx, *args)
        del args
        return _crop(piece, s if op.rows_cropped else op.rows.start(a), s, e), s

    def run_segment(self, first_slice_only: bool) -> int:
        run, rules, ops = self.run, self.rules, self.ops
        self.shapes = {name: t.shape for name, t in run.env.items()}
        slices = self.slices
        if first_slice_only:  # profiling: the slice computing the most rows (halos on both sides)
            slices = [slices[profiled_slice([op.rows for op in ops], slices, self.in_lens,
                                            [op.rows_cropped for op in ops])]]
        prepared: dict[str, object] = {}
        for j, op in enumerate(ops):
            if op.prepare is not None:
                with unit_label(op.name):
                    ctx = SliceCtx(AXIS, 0, self.lengths[j], self.lengths[j], run.globals, shapes=self.shapes)
                    prepared[op.name] = run._call(op.prepare, ctx, _OwnRows(self, j, slices, prepared))
        buffers: dict[str, torch.Tensor] = {}
        for sl in slices:
            local: dict[str, tuple[torch.Tensor, int]] = {}
            for j, op in enumerate(ops):
                pos = rules.start + j
                with unit_label(op.name):
                    made = self._unit(j, sl, local, prepared.get(op.name))
                if made is None:
                    continue
                piece, have = made
                run.grad_seen |= piece.requires_grad
                if rules.escapes(pos):
                    self._write(op, piece, have, sl.own[j], j, buffers)
                if rules.local_last(op.output) > pos:
                    local[op.output] = (piece, have)
                del piece, made
                for name in rules.release_after(pos):
                    local.pop(name, None)
            del local
        for op in ops:
            run.layouts[op.output] = op.layout
            if op.output in buffers:
                run.env[op.output] = buffers[op.output]
        return self.length

    def _write(self, op, piece: torch.Tensor, have: int, own: tuple[int, int], j: int, buffers: dict) -> None:
        run, out = self.run, op.output
        length = self.lengths[j]
        if len(self.slices) == 1 and piece.shape[-2] == length:
            buffers[out] = run.to_host(piece) if out in run.host else piece
            return
        with unit_label(f"{op.name}:output"):
            if out not in buffers:
                shape = (*piece.shape[:-2], length, piece.shape[-1])
                buffers[out] = run.host_empty(shape, piece.dtype) if out in run.host else piece.new_empty(shape)
            s, e = own
            if e > s:
                buffers[out].narrow(-2, s, e - s).copy_(_crop(piece, have, s, e))


class _OwnRows:
    """The own rows of unit ``j``'s first input, slice by slice, for its ``prepare`` (statistics):
    views of the full value when made before the segment, else recomputed per slice by the units
    of the segment it depends on. Re-iterable (a checkpointed ``prepare`` iterates again)."""

    def __init__(self, seg: RowsSegment, j: int, slices, prepared):
        self.seg, self.j, self.slices, self.prepared = seg, j, slices, prepared
        rules = seg.rules
        self.cone = [i - rules.start for i in rules.cone(rules.start + j)]
        self.name = seg.ops[j].inputs[0]
        # Held here: a checkpointed prepare iterates again in backward, after the segment has ended.
        made = {seg.ops[i].output for i in self.cone}
        reads = {n for i in self.cone for n in seg.ops[i].inputs} if self.cone else {self.name}
        self.sources = {n: seg.run.env[n] for n in reads if n not in made}
        self.host = seg.run.host

    def __iter__(self):
        seg = self.seg
        if not self.cone:
            t = self.sources[self.name]
            bounds = split_bounds(t.shape[-2], len(seg.slices))
            for s, e in bounds[: len(self.slices)] if len(self.slices) < len(seg.slices) else bounds:
                piece = t.narrow(-2, s, e - s)
                yield seg.run.stage(piece) if self.name in self.host else piece
                del piece
            return
        last = self.cone[-1]
        for sl in self.slices:
            local: dict[str, tuple[torch.Tensor, int]] = {}
            for i in self.cone:
                op = seg.ops[i]
                s, e = sl.out[i]
                if e <= s:
                    continue
                a, b = sl.slab[i]
                args = [self._read(n, a, b, local) for n in op.inputs]
                ctx = SliceCtx(AXIS, s, e, seg.lengths[i], seg.run.globals, self.prepared.get(op.name), seg.shapes)
                piece = op.fn(ctx, *args)
                del args
                local[op.output] = (_crop(piece, s if op.rows_cropped else op.rows.start(a), s, e), s)
                del piece
                for n in [n for n in local if n != seg.ops[last].output and not self._read_later(n, i)]:
                    del local[n]
            s, e = sl.own[last]
            if e > s:
                piece, have = local.pop(seg.ops[last].output)
                del local
                own = _crop(piece, have, s, e).contiguous()  # the slab's halo need not stay alive
                del piece
                yield own
                del own

    def _read_later(self, name: str, i: int) -> bool:
        return any(name in self.seg.ops[u].inputs for u in self.cone if u > i)

    def _read(self, name: str, a: int, b: int, local: dict) -> torch.Tensor:
        if name in local:
            piece, have = local[name]
            return _crop(piece, have, a, b)
        t = self.sources[name].narrow(-2, a, b - a)
        return self.seg.run.stage(t) if name in self.host else t
