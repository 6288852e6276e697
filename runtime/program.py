"""The unit program: a model forward lowered to a list of sliceable units.

An adapter turns one model class into ``Op``s in execution order. Each op reads named values and
writes one; its ``fn`` computes the output *for one slice* of its axis from slices of its inputs,
so running it on all slices and writing each result into the matching part of a full buffer
reproduces the full computation exactly. This module knows layouts and slicing, not diffusers.

Layouts (every value has the ``B*T`` frames dimension first):

- ``nchw``: ``[B*T, C, H, W]``; a token slice is ``[B*T, C, n]`` over the flattened ``H*W``.
- ``nlc``: ``[B*T, L, C]`` with ``L = H*W``; a token slice is ``[B*T, n, C]``.

Rows (``nchw`` only, any number of leading dimensions: ``[..., H, W]``): a rows slice is a range of
``H``; a rows op computes its output rows from a slab of input rows with halos, as its ``rows``
map says (:mod:`vramplan.planner.rows`; run by :mod:`.rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..planner.rows import RowMap
from ..planner.rules import split_bounds  # noqa: F401  (the executor and adapters import it from here)

Axis = Literal["frames", "tokens", "rows"]
Layout = Literal["nchw", "nlc"]
AXES: tuple[str, ...] = ("frames", "tokens", "rows")


@dataclass(frozen=True)
class UnitSpec:
    """What the planner needs to know about a unit.

    ``needs_input_stats``: the unit normalises its input with statistics over the whole token axis
    (GroupNorm over time); they are gathered in a pass over every slice of its first input before
    the slice loop. That input is read from a full value made before the segment, or, when the
    unit's own segment makes it, *recomputed* slice by slice (the executor's recompute pass).
    """

    name: str
    axis: Axis | None
    needs_input_stats: bool = False
    kind: str = ""
    # Inputs read WHOLE while the output is sliced (self-attention's keys and values for a query
    # chunk): every slice of the unit sees the full value. It must be made before the unit's
    # segment (a group never holds both a whole input's maker and its reader), and the unit's
    # output never takes over its buffer (later slices still read it).
    whole_inputs: tuple[str, ...] = ()


@dataclass
class SliceCtx:
    """What an op's ``fn`` sees besides its input slices."""

    axis: Axis | None
    start: int
    stop: int
    length: int
    globals: dict[str, Any]
    prepared: Any = None
    shapes: dict[str, torch.Size] = field(default_factory=dict)


@dataclass
class Op:
    spec: UnitSpec
    inputs: tuple[str, ...]
    output: str
    fn: Callable[..., torch.Tensor]
    layout: Layout = "nchw"
    # Called once before the slice loop with an iterable of the first input's slices (the segment's
    # bounds, in order; each slice is alive only while the iterable hands it over: read from a full
    # value, staged from host memory or recomputed). Its result reaches every slice as
    # ``ctx.prepared`` (GroupNorm statistics over all tokens). It must consume each slice as it
    # comes (under checkpointing the executor may iterate again to recompute).
    prepare: Callable[[SliceCtx, Iterable[torch.Tensor]], Any] | None = None
    # ``fn`` computes the statistics itself when ``ctx.prepared`` is None: on the CPU a one-slice segment
    # then skips ``prepare`` (PyTorch's fused GroupNorm is faster there than statistics, then normalising).
    self_stats: bool = False
    # Axis "rows": how every input's rows map to the output's (a slab with halos computes a range of
    # output rows; the executor crops it to the rows it needs).
    rows: RowMap | None = None
    # Axis "rows": ``fn`` returns exactly the rows ``[ctx.start, ctx.stop)`` (it crops inside, stage by
    # stage) instead of every row its slab gives.
    rows_cropped: bool = False
    # Axis "rows": a host-placed input reaches ``fn`` as a host view of its slab, and ``fn`` copies it to
    # the device piece by piece (a video's latent frames one at a time) instead of the whole slab at once.
    stage_inside: bool = False
    # The input holding ids whose rows ``fn`` looks up in its block's tables through
    # :func:`~vramplan.runtime.gather.gather_rows` (an embedding): when the plan streams that block, the
    # tables stay in host memory and only the rows those ids select reach the device.
    gathers: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def whole_inputs(self) -> tuple[str, ...]:
        return self.spec.whole_inputs

    def __post_init__(self) -> None:
        whole = self.spec.whole_inputs
        if whole and (not set(whole) <= set(self.inputs[1:]) or self.inputs[0] in whole):
            raise ValueError(f"{self.name}: whole inputs must be inputs other than the first (the sliced one)")


@dataclass
class Program:
    """One call of a model, lowered: initial values, ops, and how to build the model's return value."""

    ops: list[Op]
    env: dict[str, torch.Tensor]
    layouts: dict[str, Layout]
    result: str
    finish: Callable[[torch.Tensor], Any]
    globals: dict[str, Any] = field(default_factory=dict)
    # Filled by ``execute(..., keep=...)``: the kept values, untouched, after the call.
    kept: dict[str, torch.Tensor] = field(default_factory=dict)


def axis_length(t: torch.Tensor, layout: Layout, axis: Axis) -> int:
    if axis == "rows":
        return t.shape[-2]
    if axis == "frames":
        return t.shape[0]
    return t.shape[2] * t.shape[3] if layout == "nchw" else t.shape[1]


def take(t: torch.Tensor, layout: Layout, axis: Axis, start: int, stop: int) -> torch.Tensor:
    """A view of ``t`` restricted to ``[start, stop)`` along ``axis`` (never a copy)."""
    if axis == "rows":
        return t.narrow(-2, start, stop - start)
    if axis == "frames":
        return t[start:stop]
    if layout == "nchw":
        return t.view(t.shape[0], t.shape[1], -1)[:, :, start:stop]
    return t[:, start:stop]


def put(buf: torch.Tensor, layout: Layout, axis: Axis, start: int, stop: int, value: torch.Tensor) -> None:
    take(buf, layout, axis, start, stop).copy_(value)


def as_whole(piece: torch.Tensor, layout: Layout, axis: Axis, shape: tuple[int, ...]) -> torch.Tensor:
    """The value itself when one slice covers the whole axis (a token slice of ``nchw`` is flat)."""
    return piece.reshape(shape) if axis == "tokens" and layout == "nchw" else piece


def full_shape(piece: torch.Size, layout: Layout, axis: Axis, length: int, like: torch.Size) -> tuple[int, ...]:
    """The full shape of a value whose slice has shape ``piece``.

    Along frames only the first dimension grows. Along tokens the spatial extent comes from
    ``like``, the full shape of the op's first input (token ops keep the spatial grid).
    """
    if axis == "frames":
        return (length, *piece[1:])
    if layout == "nchw":
        return (piece[0], piece[1], like[-2], like[-1])
    return (piece[0], length, piece[2])


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its storage exactly once, in some order of dimensions (contiguous or a
    permutation of it): then slice views of it map one to one onto the values."""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride(), strict=True) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True
