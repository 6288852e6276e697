"""Run a unit program under a plan: Feature Slicer + Operator Grouping.

A *segment* is either one plan group (consecutive units of one axis, one slice count) or a single
ungrouped unit. A segment runs slice by slice end to end: for each slice every op of the segment
runs on that slice, so values made and used inside the segment only ever exist one slice at a
time. Values that outlive the segment are written slice by slice into one preallocated buffer —
or back into a dying input's buffer. After the segment every value past its last use is released.

*What* is alive when and which input's buffer may be reused comes from the torch-free rulebook
(:mod:`vramplan.planner.rules`), which the planner's cost model uses too. This module adds what
only real tensors tell: a buffer is reused only if its storage is the program's own (not the
caller's, not a per-call constant, not a kept value's), nothing else holds that storage, and
autograd cannot see the write (grad disabled, or nothing in the call requires grad).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..planner.rules import ProgramRules, SegmentRules, released_after_segment
from .memory import unit_label
from .program import (
    Axis,
    Op,
    Program,
    SliceCtx,
    as_whole,
    axis_length,
    full_shape,
    is_dense,
    put,
    split_bounds,
    take,
)

log = logging.getLogger(__name__)


@dataclass
class Segment:
    ops: list[Op]
    axis: Axis | None
    k: int


def execute(
    program: Program,
    segments: Sequence[Segment],
    *,
    first_slice_only: bool = False,
    observer=None,
    keep: Collection[str] = frozenset(),
    around_segment: Callable[[Segment], contextlib.AbstractContextManager | None] | None = None,
    checkpoint: bool = False,
) -> object:
    """Run ``program``'s ops, segment by segment; return the model's output.

    ``first_slice_only`` (profiling) runs only the first, largest slice of every segment: enough to
    measure each unit's per-slice memory and op count, at the cost of one unsliced forward. The
    output is then garbage (unwritten buffers), as is fine on meta tensors. ``observer(op, value,
    axis_length)`` sees every value a segment leaves behind (the profiler reads shapes from it).

    ``keep``: value names that survive the call untouched (never a reused buffer, never released);
    afterwards they are in ``program.kept``. ``around_segment(segment)`` may return a context
    manager entered around that segment's run. ``checkpoint`` runs every op slice under
    non-reentrant activation checkpointing when grad is enabled.
    """
    keep = frozenset(keep)
    known = set(program.env) | {op.output for op in program.ops}
    if keep - known:
        raise ValueError(f"keep names values this program does not have: {', '.join(sorted(keep - known))}")
    run = _Run(program, ProgramRules.of(program.ops, program.result, keep), first_slice_only, checkpoint)
    position = 0
    for seg in segments:
        end = position + len(seg.ops) - 1
        manager = around_segment(seg) if around_segment is not None else None
        with manager if manager is not None else contextlib.nullcontext():
            length = run.segment(seg, run.rules.segment(position, end))
        if observer is not None:
            for op in seg.ops:
                if op.output in run.env:
                    observer(op, run.env[op.output], length)
        for name in released_after_segment(run.rules, end, list(run.env)):
            del run.env[name]
        position = end + 1
    program.kept = {name: run.env[name] for name in keep}
    return program.finish(run.env.pop(program.result))


def _storage(t: torch.Tensor) -> int:
    # id() of the storage object: PyTorch keeps one Python object per live storage, and unlike
    # data_ptr() it tells meta storages apart.
    return id(t.untyped_storage())


class _Run:
    """One call's state: the values, their layouts, and which storages may never be written."""

    def __init__(self, program: Program, rules: ProgramRules, first_slice_only: bool, checkpoint: bool):
        self.env = dict(program.env)
        self.layouts = dict(program.layouts)
        self.globals = program.globals
        self.rules = rules
        self.first_slice_only = first_slice_only
        self.checkpoint = checkpoint
        constants = [t for t in tree_flatten(program.globals)[0] if isinstance(t, torch.Tensor)]
        caller = [*program.env.values(), *constants]
        # The caller's tensors and per-call constants: held here so that their ids stay theirs.
        self.protected = {_storage(t): t.untyped_storage() for t in caller}
        self.grad_seen = any(t.requires_grad for t in caller)

    # -- running --------------------------------------------------------------------------------
    def _call(self, fn, ctx: SliceCtx, *args):
        if self.checkpoint and torch.is_grad_enabled():
            return _checkpoint(fn, ctx, *args, use_reentrant=False)
        return fn(ctx, *args)

    def segment(self, seg: Segment, rules: SegmentRules) -> int:
        """Run one segment; returns its axis length (0 for an unsliced unit)."""
        env, layouts, ops = self.env, self.layouts, seg.ops
        first = ops[0]
        if seg.axis is None or not first.inputs:
            for op in ops:
                with unit_label(op.name):
                    ctx = SliceCtx(None, 0, 0, 0, self.globals, shapes=_shapes(env))
                    env[op.output] = self._call(op.fn, ctx, *(env[n] for n in op.inputs))
                self.grad_seen |= env[op.output].requires_grad
                layouts[op.output] = op.layout
            return 0

        axis = seg.axis
        length = axis_length(env[first.inputs[0]], layouts[first.inputs[0]], axis)
        bounds = split_bounds(length, seg.k)
        run_bounds = bounds[:1] if self.first_slice_only else bounds
        shapes = _shapes(env)
        prepared: dict[str, object] = {}
        for i, op in enumerate(ops):
            if op.prepare is not None:
                with unit_label(op.name):
                    ctx = SliceCtx(axis, 0, length, length, self.globals, shapes=shapes)
                    # Profiling needs the memory of the statistics pass, which one slice shows.
                    pieces = _Pieces(self, seg, rules, rules.start + i, run_bounds, length, shapes, prepared)
                    prepared[op.name] = self._call(op.prepare, ctx, pieces)

        buffers: dict[str, torch.Tensor] = {}
        full_shapes: dict[str, tuple[int, ...]] = {}
        taken: set[str] = set()
        for start, stop in run_bounds:
            local: dict[str, torch.Tensor] = {}
            for i, op in enumerate(ops):
                j = rules.start + i
                with unit_label(op.name):
                    args = [local[n] if n in local else take(env[n], layouts[n], axis, start, stop) for n in op.inputs]
                    ctx = SliceCtx(axis, start, stop, length, self.globals, prepared.get(op.name), shapes)
                    piece = self._call(op.fn, ctx, *args)
                    del args
                self.grad_seen |= piece.requires_grad
                out = op.output
                if out not in full_shapes:
                    like = full_shapes.get(op.inputs[0]) or tuple(env[op.inputs[0]].shape)
                    full_shapes[out] = full_shape(piece.shape, op.layout, axis, length, like)
                if rules.escapes(j):
                    if len(bounds) == 1:
                        buffers[out] = as_whole(piece, op.layout, axis, full_shapes[out])
                    else:
                        with unit_label(f"{op.name}:output"):
                            if out not in buffers:
                                buffers[out] = self._buffer(rules, j, piece, full_shapes[out], taken, buffers)
                            put(buffers[out], op.layout, axis, start, stop, piece)
                if rules.local_last(out) > j:
                    local[out] = piece
                del piece
                for name in rules.release_after(j):
                    local.pop(name, None)
            del local

        for op in ops:
            layouts[op.output] = op.layout
            if op.output in buffers:
                env[op.output] = buffers[op.output]
        return length

    # -- where an escaping output lives -----------------------------------------------------------
    def _buffer(self, rules: SegmentRules, j: int, piece, shape, taken, buffers) -> torch.Tensor:
        """A dying input's buffer when the rulebook allows it and the storage is free, else a new one."""
        held = {_storage(b) for b in buffers.values()}
        name = rules.reuse(j, taken, lambda n: self._writable(n, shape, piece, held))
        return self.env[name] if name is not None else piece.new_empty(shape)

    def _writable(self, name: str, shape, piece: torch.Tensor, held: set[int]) -> bool:
        """Whether the output (slices like ``piece``, full ``shape``) may be written over ``name``."""
        cand = self.env[name]
        if tuple(cand.shape) != tuple(shape) or cand.dtype != piece.dtype or cand.device != piece.device:
            return False
        if not is_dense(cand):  # a permuted view is fine: its slices still map 1:1 onto the values
            return False
        if torch.is_grad_enabled() and (self.grad_seen or cand.requires_grad or piece.requires_grad):
            return False  # autograd may have saved it for backward
        key = _storage(cand)
        if key in self.protected or key in held:
            return False
        # Nothing else may hold the storage: another value (a view of it, a kept value) would see
        # the writes, whatever its name.
        return not any(other != name and _storage(t) == key for other, t in self.env.items())


class _Pieces:
    """The slices of unit ``j``'s first input, one at a time, for its ``prepare``: taken from the full
    value when it was made before the segment, else recomputed per slice by the units of the
    segment it depends on (``SegmentRules.cone``), each with its own prepared statistics.
    Re-iterable (a checkpointed ``prepare`` iterates again in backward)."""

    def __init__(self, run: _Run, seg: Segment, rules: SegmentRules, j: int, bounds, length, shapes, prepared):
        self.run, self.seg, self.rules, self.j = run, seg, rules, j
        self.bounds, self.length, self.shapes, self.prepared = bounds, length, shapes, prepared
        self.cone = rules.cone(j)
        self.name = rules.program.inputs[j][0]
        last: dict[str, int] = {}
        for i in self.cone:
            for n in rules.program.inputs[i]:
                last[n] = i
        last[self.name] = j
        # cone unit -> slices that die once it has run
        self.dying = {i: [rules.program.outputs[u] for u in self.cone if u <= i and last.get(rules.program.outputs[u], -1) <= i]
                      for i in self.cone}
        # What the pass reads from before the segment, held here: a checkpointed prepare iterates
        # again in backward, after the segment has released its inputs.
        made = {rules.program.outputs[i] for i in self.cone}
        reads = [n for i in self.cone for n in rules.program.inputs[i]] if self.cone else [self.name]
        self.sources = {n: (run.env[n], run.layouts[n]) for n in reads if n not in made}

    def __iter__(self):
        run, rules, axis, name = self.run, self.rules, self.seg.axis, self.name
        for start, stop in self.bounds:
            if not self.cone:
                yield take(*self.sources[name], axis, start, stop)
                continue
            local: dict[str, torch.Tensor] = {}
            for i in self.cone:
                op = self.seg.ops[i - rules.start]
                args = [local[n] if n in local else take(*self.sources[n], axis, start, stop) for n in op.inputs]
                ctx = SliceCtx(axis, start, stop, self.length, run.globals, self.prepared.get(op.name), self.shapes)
                local[op.output] = op.fn(ctx, *args)
                del args
                for n in self.dying[i]:
                    local.pop(n, None)
            piece = local.pop(name)
            del local
            yield piece
            del piece


def _shapes(env: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {name: t.shape for name, t in env.items()}
