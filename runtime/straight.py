"""Run an unsliced unit program straight: one call per op, each value dropped after its last reader.

What :func:`~vramplan.runtime.executor.execute` does for segments of one slice each, without its
per-slice bookkeeping (slice bounds, buffers, staging, rules per segment): on a small model that
bookkeeping is a visible share of a call, and Step Rehash's reuse calls, which run a few ops, pay it
in full. The order of reads and drops is computed once per program (:class:`Straight`) and reused at
every call. Only for what it can run exactly as the executor does (:func:`straight_ok`): every segment
one slice, no rows axis, no statistics pass the executor would run, no host placement, streaming,
bridged hooks, checkpointing or memory tracker; anything else goes through the executor.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence

import torch

from .memory import current_tracker
from .program import Op, Program, SliceCtx, as_whole, axis_length, full_shape, take


class _Shapes(Mapping):
    """``ctx.shapes`` without a copy: the shapes of the values alive when the op runs."""

    def __init__(self, env: dict[str, torch.Tensor]):
        self.env = env

    def __getitem__(self, name: str) -> torch.Size:
        return self.env[name].shape

    def __iter__(self) -> Iterator[str]:
        return iter(self.env)

    def __len__(self) -> int:
        return len(self.env)


def straight_ok(segments: Sequence, device: torch.device | None, checkpoint: bool = False, **placement) -> bool:
    """Whether ``segments`` can run straight with the executor's result: one slice each, no rows axis, no
    statistics pass (an op computing its own statistics only on the CPU, as the executor does), no host
    placement, no checkpointing, no memory tracker (it attributes memory per unit through the executor)."""
    if checkpoint or placement.get("host") or current_tracker() is not None:
        return False
    cpu = device is not None and device.type == "cpu"
    return all(seg.k == 1 and seg.axis != "rows" and all(op.prepare is None or (op.self_stats and cpu)
                                                         for op in seg.ops) for seg in segments)


class Straight:
    """A program's ops with their segments' axes and, per op, the values to drop after it (computed once)."""

    def __init__(self, segments: Sequence, result: str, keep: Collection[str] = frozenset()):
        self.keep = frozenset(keep)
        self.steps: list[tuple[Op, object]] = [(op, seg.axis) for seg in segments for op in seg.ops]
        last: dict[str, int] = {}
        for i, (op, _) in enumerate(self.steps):
            for name in op.inputs:
                last[name] = i
        stay = {result, *self.keep}
        self.drop: list[tuple[str, ...]] = [() for _ in self.steps]
        for name, i in last.items():
            if name not in stay:
                self.drop[i] += (name,)

    def run(self, program: Program) -> object:
        """``program``'s output (its ops must be this one's); the kept values end in ``program.kept``."""
        env = dict(program.env)
        layouts = dict(program.layouts)
        shapes = _Shapes(env)
        g = program.globals
        for (op, axis), drop in zip(self.steps, self.drop, strict=True):
            if axis is None or not op.inputs:
                out = op.fn(SliceCtx(None, 0, 0, 0, g, shapes=shapes), *[env[n] for n in op.inputs])
            else:
                first = env[op.inputs[0]]
                n = axis_length(first, layouts[op.inputs[0]], axis)
                args = [env[i] if i in op.whole_inputs else take(env[i], layouts[i], axis, 0, n) for i in op.inputs]
                piece = op.fn(SliceCtx(axis, 0, n, n, g, shapes=shapes), *args)
                del args
                out = as_whole(piece, op.layout, axis, full_shape(piece.shape, op.layout, axis, n, tuple(first.shape)))
                del piece
            env[op.output] = out
            layouts[op.output] = op.layout
            del out
            for name in drop:
                env.pop(name, None)
        program.kept = {name: env[name] for name in self.keep}
        return program.finish(env.pop(program.result))
