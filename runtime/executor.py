"""Run a unit program under a plan: Feature Slicer + Operator Grouping.

A *segment* is either one plan group (consecutive units of one axis, one slice count) or a single
ungrouped unit. A segment runs slice by slice end to end: for each slice every op of the segment
runs on that slice, so values made and used inside the segment only ever exist one slice at a
time. Values that outlive the segment are written slice by slice into one preallocated buffer —
or, when an input of the same shape dies in this segment and nothing else holds it, back into
that input's buffer. After the segment every value past its last use is released.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
    program: Program, segments: Sequence[Segment], *, first_slice_only: bool = False, observer=None
) -> object:
    """Run ``program``'s ops, segment by segment; return the model's output.

    ``first_slice_only`` (profiling) runs only the first, largest slice of every segment: enough to
    measure each unit's per-slice memory and op count, at the cost of one unsliced forward. The
    output is then garbage (unwritten buffers), as is fine on meta tensors. ``observer(op, value,
    axis_length)`` sees every value a segment leaves behind (the profiler reads shapes from it).
    """
    env = dict(program.env)
    layouts = dict(program.layouts)
    owned: set[str] = set()
    last_use = _last_uses(program)
    position = 0
    for seg in segments:
        end = position + len(seg.ops) - 1
        length = _run_segment(seg, env, layouts, owned, last_use, end, program.globals, first_slice_only)
        if observer is not None:
            for op in seg.ops:
                if op.output in env:
                    observer(op, env[op.output], length)
        for name in [n for n in env if last_use.get(n, -1) <= end and n != program.result]:
            del env[name]
        position = end + 1
    return program.finish(env.pop(program.result))


def _last_uses(program: Program) -> dict[str, int]:
    last: dict[str, int] = {}
    for i, op in enumerate(program.ops):
        for name in op.inputs:
            last[name] = i
        last.setdefault(op.output, i)
    last[program.result] = len(program.ops)
    return last


def _run_segment(seg, env, layouts, owned, last_use, end, globals_, first_slice_only=False) -> int:
    """Run one segment; returns its axis length (0 for an unsliced unit)."""
    ops = seg.ops
    first = ops[0]
    if seg.axis is None or not first.inputs:
        for op in ops:
            with unit_label(op.name):
                ctx = SliceCtx(None, 0, 0, 0, globals_, shapes=_shapes(env))
                env[op.output] = op.fn(ctx, *(env[n] for n in op.inputs))
            layouts[op.output] = op.layout
            owned.add(op.output)
        return 0

    axis = seg.axis
    lead = env[first.inputs[0]]
    length = axis_length(lead, layouts[first.inputs[0]], axis)
    bounds = split_bounds(length, seg.k)
    shapes = _shapes(env)
    prepared = {}
    for op in ops:
        if op.prepare is not None:
            with unit_label(op.name):
                ctx = SliceCtx(axis, 0, length, length, globals_, shapes=shapes)
                # Profiling needs the memory of the statistics pass, which one slice shows.
                prepared[op.name] = op.prepare(ctx, env[op.inputs[0]], bounds[:1] if first_slice_only else bounds)

    escaping = {op.output for op in ops if last_use.get(op.output, -1) > end}
    # Reads inside the segment: value name -> index (within ops) of its last read.
    local_last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in op.inputs:
            local_last[name] = i
    buffers: dict[str, torch.Tensor] = {}
    full_shapes: dict[str, tuple[int, ...]] = {}

    for start, stop in bounds[:1] if first_slice_only else bounds:
        local: dict[str, torch.Tensor] = {}
        for i, op in enumerate(ops):
            with unit_label(op.name):
                args = [
                    local[n] if n in local else take(env[n], layouts[n], axis, start, stop) for n in op.inputs
                ]
                ctx = SliceCtx(axis, start, stop, length, globals_, prepared.get(op.name), shapes)
                piece = op.fn(ctx, *args)
                del args
            if op.output not in full_shapes:
                like = full_shapes.get(op.inputs[0]) or tuple(env[op.inputs[0]].shape)
                full_shapes[op.output] = full_shape(piece.shape, op.layout, axis, length, like)
            if op.output in escaping:
                if len(bounds) == 1:
                    buffers[op.output] = as_whole(piece, op.layout, axis, full_shapes[op.output])
                else:
                    with unit_label(f"{op.name}:output"):
                        if op.output not in buffers:
                            buffers[op.output] = _output_buffer(
                                full_shapes[op.output], piece, op, i, env, owned, last_use, end, local_last, buffers
                            )
                        put(buffers[op.output], op.layout, axis, start, stop, piece)
            if local_last.get(op.output, -1) > i:
                local[op.output] = piece
            del piece
            for name in [n for n in local if local_last.get(n, -1) <= i]:
                del local[name]
        del local

    for op in ops:
        layouts[op.output] = op.layout
        owned.add(op.output)
        if op.output in buffers:
            env[op.output] = buffers[op.output]
    return length


def _output_buffer(shape, piece, op, i, env, owned, last_use, end, local_last, buffers):
    """Where the escaping output of ``op`` (the segment's ``i``-th) lives.

    The buffer of one of ``op``'s own inputs is reused when that input has the output's shape, was
    made by this program (not the caller's tensor), is read for the last time by ``op`` and
    nothing else holds it: each slice of it is read before the same slice of the output is
    written. Otherwise a new buffer. The planner's memory model assumes exactly this rule.
    """
    held = {id(b.untyped_storage()) for b in buffers.values()}
    for name in op.inputs:
        if name not in env or name not in owned:
            continue
        cand = env[name]
        if (
            tuple(cand.shape) == tuple(shape)
            and cand.dtype == piece.dtype
            and is_dense(cand)  # e.g. a permuted view: slices still map 1:1
            and last_use.get(name, -1) <= end
            and local_last.get(name, -1) <= i
            and id(cand.untyped_storage()) not in held
            and not _shared(name, cand, env, last_use, end)
        ):
            return cand
    return piece.new_empty(shape)


def _shared(name: str, tensor: torch.Tensor, env, last_use, end) -> bool:
    """Whether another value that outlives the segment shares ``tensor``'s storage."""
    key = id(tensor.untyped_storage())
    return any(
        other != name and last_use.get(other, -1) > end and id(t.untyped_storage()) == key
        for other, t in env.items()
    )


def _shapes(env: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {name: t.shape for name, t in env.items()}
