"""Rows lowering of the 2-D VAE building blocks (diffusers ``ResnetBlock2D``, ``Downsample2D``,
``Upsample2D``, the encoder/decoder heads): units sliced along the height with halos.

A ``ResnetBlock2D`` has two GroupNorms, each over a whole image, so it becomes two units: ``norm1``
(statistics of its input over all rows, norm1 + act + conv1) and ``norm2`` (statistics of conv1's
output, norm2 + act + conv2, + the shortcut of the block input). Each needs its input's moments
over all rows (``prepare``): from the full value, or recomputed slice by slice in a group.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ...planner.rows import CONV3, RowMap, RowStep
from ..norm import merged_moments, normalize_groups
from ..program import Op, SliceCtx, UnitSpec


def rows_op(name: str, inputs: tuple[str, ...], fn, rows: RowMap, kind: str = "", stats: torch.nn.GroupNorm | None = None
            ) -> Op:
    """A rows unit; ``stats``: the GroupNorm whose statistics over all rows of the first input it needs."""
    spec = UnitSpec(name, "rows", needs_input_stats=stats is not None, kind=kind)
    return Op(spec, tuple(inputs), name, fn, "nchw", row_stats(stats) if stats is not None else None, rows=rows)


def row_stats(norm: torch.nn.GroupNorm):
    """``prepare`` hook: per-(sample, group) moments over channels in the group and every row and
    column, merged from the own rows ``[..., C, rows, W]`` of each slice (any leading dims: the
    first is the sample, the ones between C and the rows are reduced too, as a 5-D GroupNorm does)."""

    dtype = getattr(norm, "dtype", None) if isinstance(norm, _CastNorm) else None

    def prepare(ctx: SliceCtx, pieces: Iterable[torch.Tensor]):
        if dtype is not None:
            pieces = (p.to(dtype) for p in pieces)
        return streamed_moments(pieces, norm.num_groups)

    return prepare


def streamed_moments(pieces: Iterable[torch.Tensor], groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~vramplan.runtime.norm.merged_moments` of ``[N, C, ...]`` pieces grouped by channel,
    holding no piece while the next one is made (a recomputed piece is a whole slab's work)."""
    it = iter(pieces)
    state = None
    while True:
        piece = next(it, None)
        if piece is None:
            break
        # fp32 and contiguous (one copy at most): a view of the full value and a recomputed piece take the
        # same reduction kernel (bitwise the same statistics for a split plan and its recompute group)
        x = piece.float().contiguous()
        part = merged_moments([x.reshape(x.shape[0], groups, -1)], reduce_dims=(2,))
        del x
        n = piece[0, 0].numel() * (piece.shape[1] // groups)
        del piece
        state = _merge(state, part, n)
    if state is None:
        raise ValueError("no rows to take statistics over")
    return state[0], state[1] / state[2]


def _merge(state, part, n: int):
    """Chan et al.'s pairwise update of (mean, m2, count) with a piece's (mean, var) over ``n`` values."""
    mean_i, var_i = part
    if state is None:
        return mean_i, var_i * n, n
    mean, m2, count = state
    total = count + n
    delta = mean_i - mean
    return mean + delta * (n / total), m2 + var_i * n + delta.square() * (count * n / total), total


class _CastNorm:
    """A GroupNorm's ``num_groups`` for :func:`row_stats`, whose pieces are cast first (to match a unit
    that casts its input before normalising)."""

    def __init__(self, norm: torch.nn.GroupNorm, dtype: torch.dtype):
        self.num_groups, self.dtype = norm.num_groups, dtype


def group_norm(norm: torch.nn.GroupNorm, x: torch.Tensor, stats) -> torch.Tensor:
    """``norm(x)`` with the statistics of the whole value (``stats``), or x's own when unsliced."""
    if stats is None:
        return norm(x)
    mean, var = stats
    params = [t for t in (x, mean, var, norm.weight, norm.bias) if t is not None]
    if x.dtype == torch.float32 or (torch.is_grad_enabled() and any(t.requires_grad for t in params)):
        return normalize_groups(x, mean, var, norm.num_groups, norm.eps, norm.weight, norm.bias)
    # A half-precision slab without autograd: one pass, as an inference batch norm over the [1, N*C, ...] view
    # with the per-(sample, channel) statistics (fp32 math inside, the result in x's dtype), where
    # normalize_groups would make an fp32 copy of the slab (twice its bytes) first.
    n, c = x.shape[:2]
    per_channel = c // norm.num_groups

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t.float().repeat_interleave(per_channel, dim=1).reshape(n * c)

    weight = norm.weight.float().repeat(n) if norm.weight is not None else None
    bias = norm.bias.float().repeat(n) if norm.bias is not None else None
    out = F.batch_norm(x.reshape(1, n * c, *x.shape[2:]), expand(mean), expand(var), weight, bias, False, 0.0, norm.eps)
    return out.reshape(x.shape)


def conv_map(conv: torch.nn.Conv2d) -> RowStep:
    """The row step of a 2-D convolution (its padding on both sides of the height)."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    if isinstance(conv.padding, str):
        raise ValueError(f"convolution with padding={conv.padding!r} has no row map")
    return RowStep(kernel=k, stride=s, pad=p)


def resnet2d(add, prefix: str, block, h: str, cast_to: torch.dtype | None = None) -> str:
    """``ResnetBlock2D`` without time embedding (a VAE's): ``norm1`` and ``norm2`` units. ``cast_to``: the
    block input is first cast to it (SVD's temporal decoder casts the mid block's output to its up
    blocks' dtype); both units cast their slab of it, so the statistics see the cast values."""
    if block.upsample is not None or block.downsample is not None or block.time_emb_proj is not None:
        raise ValueError(f"{prefix}: resnets that resample or take a time embedding have no rows lowering")
    c1, c2 = RowMap.of(conv_map(block.conv1)), RowMap.of(conv_map(block.conv2))
    stats1 = block.norm1 if cast_to is None else _CastNorm(block.norm1, cast_to)

    def first(ctx: SliceCtx, x):
        if cast_to is not None:
            x = x.to(cast_to)
        return block.conv1(block.nonlinearity(group_norm(block.norm1, x, ctx.prepared)))

    def second(ctx: SliceCtx, t, x):
        if cast_to is not None:
            x = x.to(cast_to)
        t = block.nonlinearity(group_norm(block.norm2, t, ctx.prepared))
        t = block.conv2(block.dropout(t))
        if block.conv_shortcut is not None:
            x = block.conv_shortcut(x)
        # x is read over conv2's slab: crop both to the rows conv2 returns (same for stride-1 convs).
        return (x + t) / block.output_scale_factor

    t = add(rows_op(f"{prefix}.norm1", (h,), first, c1, "resnet", stats1))
    return add(rows_op(f"{prefix}.norm2", (t, h), second, c2, "resnet", block.norm2))


def downsample2d(add, name: str, down, h: str) -> str:
    if down.norm is not None or not down.use_conv:
        raise ValueError(f"{name}: only a convolutional Downsample2D without norm has a rows lowering")
    conv = down.conv
    k, s = conv.kernel_size[0], conv.stride[0]
    step = RowStep(kernel=k, stride=s, pad=0, pad_end=1) if down.padding == 0 else conv_map(conv)
    return add(rows_op(name, (h,), lambda ctx, x: down(x), RowMap.of(step), "down"))


def upsample2d(add, name: str, up, h: str) -> str:
    """Nearest 2x upsampling (+ 3x3 conv): diffusers' VAE ``Upsample2D``."""
    if up.use_conv_transpose or up.norm is not None or up.interpolate is False:
        raise ValueError(f"{name}: only a nearest-interpolating Upsample2D has a rows lowering")
    steps = [RowStep(up=2)]
    if up.use_conv:
        steps.append(conv_map(up.conv))
    return add(rows_op(name, (h,), lambda ctx, x: up(x), RowMap.of(*steps), "up"))


def head(add, name: str, norm, act, conv, h: str, after=None) -> str:
    """GroupNorm + activation + conv (+ ``after``, a per-position module such as a 1x1 quant conv)."""

    def fn(ctx: SliceCtx, x):
        out = conv(act(group_norm(norm, x, ctx.prepared)))
        return after(out) if after is not None else out

    return add(rows_op(name, (h,), fn, RowMap.of(conv_map(conv)), "conv", norm))


__all__ = ["CONV3", "conv_map", "downsample2d", "group_norm", "head", "resnet2d", "row_stats", "rows_op", "upsample2d"]

