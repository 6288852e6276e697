"""Run a unit program under a plan: Feature Slicer + Operator Grouping.

A *segment* is either one plan group (consecutive units of one axis, one slice count) or a single
ungrouped unit. A segment runs slice by slice end to end: for each slice every op of the segment
runs on that slice, so values made and used inside the segment only ever exist one slice at a
time. Values that outlive the segment are written slice by slice into one preallocated buffer —
or back into a dying input's buffer. After the segment every value past its last use is released.

A unit that needs statistics over its whole first input gets them in a pass before the slice
loop: over slices of the full value when it was made before the segment, else by *recomputing*
the units of the segment it depends on, slice by slice with the same bounds (so the statistics
equal the split plan's bit for bit). Values placed on the host (``execute(host=...)``) are
written into host buffers and *staged* back slice by slice for every op that reads them. With
``Segment.depth`` > 1 the slices run in waves: each op on every slice of the wave, on CUDA each
slice on its own stream.

*What* is alive when and which input's buffer may be reused comes from the torch-free rulebook
(:mod:`vramplan.planner.rules`), which the planner's cost model uses too. This module adds what
only real tensors tell: a buffer is reused only if its storage is the program's own (not the
caller's, not a per-call constant, not a kept value's), nothing else holds that storage, and
autograd cannot see the write (grad disabled, or nothing in the call requires grad).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..planner.rules import ProgramRules, SegmentRules, released_after_segment
from .memory import host_allocation, unit_label
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
    """Ops run slice by slice end to end. ``depth``: slices in flight at once (a *wave*): each op runs on
    every slice of the wave before the next op, each slice on its own CUDA stream when the tensors
    are on CUDA, one after another elsewhere (the same result)."""

    ops: list[Op]
    axis: Axis | None
    k: int
    depth: int = 1


def unit_by_unit(ops: Sequence[Op]) -> list[Segment]:
    """Every op its own segment, whole (one slice): the original computation, unit by unit."""
    return [Segment([op], op.spec.axis, 1) for op in ops]


def execute(
    program: Program,
    segments: Sequence[Segment],
    *,
    first_slice_only: bool = False,
    observer=None,
    keep: Collection[str] = frozenset(),
    around_segment: Callable[[Segment], contextlib.AbstractContextManager | None] | None = None,
    checkpoint: bool = False,
    host: Collection[str] = frozenset(),
    host_device: torch.device | str | None = None,
) -> object:
    """Run ``program``'s ops, segment by segment; return the model's output.

    ``first_slice_only`` (profiling) runs only the first, largest slice of every segment: enough to
    measure each unit's per-slice memory and op count, at the cost of one unsliced forward. The
    output is then garbage (unwritten buffers), as is fine on meta tensors. ``observer(op, value,
    axis_length)`` sees every value a segment leaves behind (the profiler reads shapes from it).

    ``keep``: value names that survive the call untouched (never a reused buffer, never released);
    afterwards they are in ``program.kept``. ``around_segment(segment)`` may return a context
    manager entered around that segment's run. ``checkpoint`` runs every op slice and statistics
    pass under non-reentrant activation checkpointing when grad is enabled.

    ``host``: op outputs placed in host memory on ``host_device`` between segments (never initial
    values, the result or kept values: ValueError). An escaping host output is written slice by
    slice into a host buffer (pinned when the host is the CPU and the computation is on CUDA; if
    pinning fails, pageable with a warning), or copied whole when unsliced; every slice a later op
    reads is staged (copied to the compute device, alive during that op's call only).
    ``host_device=None``: host == the compute device; the same copies happen and the host copies
    are never counted by this thread's active tracker (:func:`~.memory.mark_host`).
    """
    keep, host = frozenset(keep), frozenset(host)
    known = set(program.env) | {op.output for op in program.ops}
    if keep - known:
        raise ValueError(f"keep names values this program does not have: {', '.join(sorted(keep - known))}")
    _check_host(program, host, keep)
    rules = ProgramRules.of(program.ops, program.result, keep, host)
    run = _Run(program, rules, first_slice_only, checkpoint, host_device)
    position = 0
    for seg in segments:
        end = position + len(seg.ops) - 1
        broken = rules.whole_made_inside(position, end)
        if broken:
            op = program.ops[broken[0]]
            raise ValueError(f"{op.name} reads {', '.join(op.whole_inputs)} whole, so it cannot share a segment with "
                             "the unit that makes it")
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


def _check_host(program: Program, host: frozenset[str], keep: frozenset[str]) -> None:
    outputs = {op.output for op in program.ops}
    why = []
    for name in sorted(host):
        if name in program.env:
            why.append(f"{name} is an initial value (the caller's)")
        elif name not in outputs:
            why.append(f"{name} is not a value of this program")
        elif name == program.result:
            why.append(f"{name} is the result")
        elif name in keep:
            why.append(f"{name} is kept")
    if why:
        raise ValueError("cannot place on host: " + "; ".join(why) + " (only op outputs may be)")


_side_streams = threading.local()  # per thread: compute device -> side streams for waves
_pinning = threading.local()  # per thread: the lists watching_pinning() collects failures into


@contextlib.contextmanager
def watching_pinning():
    """Collect, while inside, the pinning failures of host buffers in this thread's calls: one message
    per call that fell back to pageable host memory (each warns once); ``run`` re-prices the plan so."""
    seen: list[str] = []
    watchers = _pinning.__dict__.setdefault("watchers", [])
    watchers.append(seen)
    try:
        yield seen
    finally:
        del watchers[next(i for i, w in enumerate(watchers) if w is seen)]


def compute_device(program: Program) -> torch.device:
    """Where the program computes: the device of its initial values (a CUDA one if any is)."""
    devices = [t.device for t in program.env.values() if isinstance(t, torch.Tensor)]
    return next((d for d in devices if d.type == "cuda"), devices[0] if devices else torch.device("cpu"))


def _storage(t: torch.Tensor) -> int:
    # id() of the storage object: PyTorch keeps one Python object per live storage, and unlike
    # data_ptr() it tells meta storages apart.
    return id(t.untyped_storage())


class _Run:
    """One call's state: the values, their layouts, and which storages may never be written."""

    def __init__(
        self, program: Program, rules: ProgramRules, first_slice_only: bool, checkpoint: bool, host_device=None
    ):
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
        self.host = rules.host
        self.device = compute_device(program)
        self.host_device = torch.device(host_device) if host_device is not None else self.device
        self.pin = self.host_device.type == "cpu" and self.device.type == "cuda"
        self.cuda = self.device.type == "cuda"
        self._main = None  # the compute stream while a wave runs on side streams

    # -- running --------------------------------------------------------------------------------
    def _call(self, fn, ctx: SliceCtx, *args):
        if self.checkpoint and torch.is_grad_enabled():
            return _checkpoint(fn, ctx, *args, use_reentrant=False)
        return fn(ctx, *args)

    def segment(self, seg: Segment, rules: SegmentRules) -> int:
        """Run one segment; returns its axis length (0 for an unsliced unit)."""
        env, layouts, ops = self.env, self.layouts, seg.ops
        first = ops[0]
        if seg.axis == "rows" and first.inputs:  # slabs with halos: vramplan.runtime.rows
            from .rows import RowsSegment

            return RowsSegment(self, seg, rules).run_segment(self.first_slice_only)
        if seg.axis is None or not first.inputs:
            for op in ops:
                with unit_label(op.name):
                    ctx = SliceCtx(None, 0, 0, 0, self.globals, shapes=_shapes(env))
                    args = [self.stage(env[n]) if n in self.host else env[n] for n in op.inputs]
                    out = self._call(op.fn, ctx, *args)
                    del args
                self.grad_seen |= out.requires_grad
                env[op.output] = self.to_host(out) if op.output in self.host else out
                del out
                layouts[op.output] = op.layout
            return 0

        axis = seg.axis
        length = axis_length(env[first.inputs[0]], layouts[first.inputs[0]], axis)
        bounds = split_bounds(length, seg.k)
        run_bounds = bounds[:1] if self.first_slice_only else bounds
        shapes = _shapes(env)
        prepared: dict[str, object] = {}
        whole = len(bounds) == 1 and not self.first_slice_only and self.device.type == "cpu"
        for i, op in enumerate(ops):
            if op.prepare is not None and not (whole and op.self_stats):
                with unit_label(op.name):
                    ctx = SliceCtx(axis, 0, length, length, self.globals, shapes=shapes)
                    # Profiling needs the memory of the statistics pass, which one slice shows.
                    pieces = _Pieces(self, seg, rules, rules.start + i, run_bounds, length, shapes, prepared)
                    prepared[op.name] = self._call(op.prepare, ctx, pieces)

        state = _SegmentState(seg, rules, axis, length, len(bounds), shapes, prepared)
        depth = max(1, seg.depth)
        for w0 in range(0, len(run_bounds), depth):
            wave = run_bounds[w0 : w0 + depth]
            streams = self.streams(len(wave)) if self.cuda and len(wave) > 1 else None
            locals_: list[dict[str, torch.Tensor]] = [{} for _ in wave]
            if streams is not None:
                main = self._main = torch.cuda.current_stream(self.device)
                for stream in streams:
                    stream.wait_stream(main)
            for i, op in enumerate(ops):
                for (start, stop), local, stream in zip(wave, locals_, streams or [None] * len(wave), strict=True):
                    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                        self._slice(state, rules.start + i, op, start, stop, local)
            del locals_
            if streams is not None:
                for stream in streams:
                    main.wait_stream(stream)
                self._main = None

        for op in ops:
            layouts[op.output] = op.layout
            if op.output in state.buffers:
                env[op.output] = state.buffers[op.output]
        return length

    def _slice(self, state: _SegmentState, j: int, op: Op, start: int, stop: int, local: dict) -> None:
        """Unit ``j`` on one slice: its output piece goes to the local slices and/or its full buffer."""
        env, layouts, axis, rules = self.env, self.layouts, state.axis, state.rules
        whole = op.whole_inputs
        with unit_label(op.name):
            staged = {
                n: self.stage(env[n] if n in whole else take(env[n], layouts[n], axis, start, stop))
                for n in rules.staged(j)
            }
            args = [
                local[n] if n in local else staged[n] if n in staged else env[n] if n in whole
                else take(env[n], layouts[n], axis, start, stop)
                for n in op.inputs
            ]
            del staged
            ctx = SliceCtx(axis, start, stop, state.length, self.globals, state.prepared.get(op.name), state.shapes)
            piece = self._call(op.fn, ctx, *args)
            del args
        self.grad_seen |= piece.requires_grad
        out = op.output
        full_shapes, buffers = state.full_shapes, state.buffers
        if out not in full_shapes:
            like = full_shapes.get(op.inputs[0]) or tuple(env[op.inputs[0]].shape)
            full_shapes[out] = full_shape(piece.shape, op.layout, axis, state.length, like)
        if rules.escapes(j):
            if state.slices == 1:
                whole = as_whole(piece, op.layout, axis, full_shapes[out])
                buffers[out] = self.to_host(whole) if out in self.host else whole
                del whole
            else:
                with unit_label(f"{op.name}:output"):
                    if out not in buffers:
                        buffers[out] = self._buffer(rules, j, piece, full_shapes[out], state.taken, buffers)
                    put(buffers[out], op.layout, axis, start, stop, piece)
        if rules.local_last(out) > j:
            local[out] = piece
        del piece
        for name in rules.release_after(j):
            local.pop(name, None)

    def streams(self, n: int) -> list:
        """``n`` side streams of the compute device: the same ones at every call of this thread, so
        that the caching allocator's per-stream pools are reused rather than spread over new streams."""
        pools = getattr(_side_streams, "pools", None)
        if pools is None:
            pools = _side_streams.pools = {}
        pool = pools.setdefault(self.device, [])
        while len(pool) < n:
            pool.append(torch.cuda.Stream(self.device))
        return pool[:n]

    # -- host placement ---------------------------------------------------------------------------
    def stage(self, t: torch.Tensor) -> torch.Tensor:
        return _stage(self.device, t)

    def host_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A new host tensor (pinned when the host is the CPU under a CUDA computation), never counted
        by this thread's active tracker."""
        with host_allocation():
            if self.pin:
                try:
                    return torch.empty(shape, dtype=dtype, device=self.host_device, pin_memory=True)
                except RuntimeError as err:
                    self.pin = False
                    for seen in getattr(_pinning, "watchers", ()):
                        seen.append(f"{type(err).__name__}: {err}")
                    warnings.warn(
                        f"pinned host memory could not be allocated ({err}); host-placed values use pageable "
                        "memory (slower transfers)",
                        RuntimeWarning,
                        stacklevel=4,
                    )
            return torch.empty(shape, dtype=dtype, device=self.host_device)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of a whole value (the device tensor is dropped by the caller)."""
        out = self.host_empty(t.shape, t.dtype)
        with host_allocation():
            out.copy_(t)
        return out

    # -- where an escaping output lives -----------------------------------------------------------
    def _buffer(self, rules: SegmentRules, j: int, piece, shape, taken, buffers) -> torch.Tensor:
        """A dying input's buffer when the rulebook allows it and the storage is free, else a new one
        (on the host for a host-placed output)."""
        held = {_storage(b) for b in buffers.values()}
        on_host = rules.program.outputs[j] in self.host
        device = self.host_device if on_host else piece.device
        name = rules.reuse(j, taken, lambda n: self._writable(n, shape, piece, device, held))
        if name is not None:
            return self.env[name]
        if on_host:
            return self.host_empty(shape, piece.dtype)
        if self._main is not None:
            # On a wave's side stream: allocate on the compute stream, which joins every side stream at
            # the wave's end (so the buffer outlives the wave with no cross-stream use to record).
            with torch.cuda.stream(self._main):
                return piece.new_empty(shape)
        return piece.new_empty(shape)

    def _writable(self, name: str, shape, piece: torch.Tensor, device: torch.device, held: set[int]) -> bool:
        """Whether the output (slices like ``piece``, full ``shape``, on ``device``) may be written over ``name``."""
        cand = self.env[name]
        if tuple(cand.shape) != tuple(shape) or cand.dtype != piece.dtype or cand.device != device:
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


@dataclass
class _SegmentState:
    seg: Segment
    rules: SegmentRules
    axis: Axis
    length: int
    slices: int
    shapes: dict
    prepared: dict
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    full_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)


class _Pieces:
    """The slices of unit ``j``'s first input, one at a time, for its ``prepare``: taken from the full
    value when it was made before the segment, else recomputed per slice by the units of the
    segment it depends on (``SegmentRules.cone``), each with its own prepared statistics.
    Re-iterable (a checkpointed ``prepare`` iterates again in backward)."""

    def __init__(self, run: _Run, seg: Segment, rules: SegmentRules, j: int, bounds, length, shapes, prepared):
        # No reference to the run itself: a checkpointed prepare keeps this object until backward.
        self.globals, self.stage, self.seg, self.rules, self.j = run.globals, partial(_stage, run.device), seg, rules, j
        self.bounds, self.length, self.shapes, self.prepared = bounds, length, shapes, prepared
        self.cone = rules.cone(j)
        self.name = rules.program.inputs[j][0]
        self.dying = rules.recompute_release_after(j)  # cone unit -> slices that die once it has run
        # What the pass reads from before the segment, held here: a checkpointed prepare iterates
        # again in backward, after the segment has released its inputs.
        made = {rules.program.outputs[i] for i in self.cone}
        reads = [n for i in self.cone for n in rules.program.inputs[i]] if self.cone else [self.name]
        self.sources = {n: (run.env[n], run.layouts[n], n in run.host) for n in reads if n not in made}

    def _read(self, name: str, start: int, stop: int, whole: bool = False) -> torch.Tensor:
        t, layout, on_host = self.sources[name]
        piece = t if whole else take(t, layout, self.seg.axis, start, stop)
        return self.stage(piece) if on_host else piece

    def __iter__(self):
        rules, axis, name = self.rules, self.seg.axis, self.name
        for start, stop in self.bounds:
            if not self.cone:
                yield self._read(name, start, stop)
                continue
            local: dict[str, torch.Tensor] = {}
            for i in self.cone:
                op = self.seg.ops[i - rules.start]
                staged = {n: self._read(n, start, stop, n in op.whole_inputs)
                          for n in dict.fromkeys(op.inputs) if n not in local}
                args = [local[n] if n in local else staged[n] for n in op.inputs]
                del staged
                ctx = SliceCtx(axis, start, stop, self.length, self.globals, self.prepared.get(op.name), self.shapes)
                local[op.output] = op.fn(ctx, *args)
                del args
                for n in self.dying[i]:
                    local.pop(n, None)
            piece = local.pop(name)
            del local
            yield piece
            del piece


def _stage(device: torch.device, t: torch.Tensor) -> torch.Tensor:
    """A host value's slice (or whole value) as a new tensor on the compute device (asynchronous from
    pinned memory under CUDA: stream-ordered before the op that reads it)."""
    return t.to(device, copy=True, non_blocking=device.type == "cuda" and t.is_pinned())


def _shapes(env: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {name: t.shape for name, t in env.items()}
