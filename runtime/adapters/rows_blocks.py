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

    def prepare(ctx: SliceCtx, pieces: Iterable[torch.Tensor]):
        g = norm.num_groups
        return merged_moments((p.reshape(p.shape[0], g, -1) for p in pieces), reduce_dims=(2,))

    return prepare


def group_norm(norm: torch.nn.GroupNorm, x: torch.Tensor, stats) -> torch.Tensor:
    """``norm(x)`` with the statistics of the whole value (``stats``), or x's own when unsliced."""
    if stats is None:
        return norm(x)
    mean, var = stats
    return normalize_groups(x, mean, var, norm.num_groups, norm.eps, norm.weight, norm.bias)


def conv_map(conv: torch.nn.Conv2d) -> RowStep:
    """The row step of a 2-D convolution (its padding on both sides of the height)."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    if isinstance(conv.padding, str):
        raise ValueError(f"convolution with padding={conv.padding!r} has no row map")
    return RowStep(kernel=k, stride=s, pad=p)


def resnet2d(add, prefix: str, block, h: str) -> str:
    """``ResnetBlock2D`` without time embedding (a VAE's): ``norm1`` and ``norm2`` units."""
    if block.upsample is not None or block.downsample is not None or block.time_emb_proj is not None:
        raise ValueError(f"{prefix}: resnets that resample or take a time embedding have no rows lowering")
    c1, c2 = RowMap.of(conv_map(block.conv1)), RowMap.of(conv_map(block.conv2))

    def first(ctx: SliceCtx, x):
        return block.conv1(block.nonlinearity(group_norm(block.norm1, x, ctx.prepared)))

    def second(ctx: SliceCtx, t, x):
        t = block.nonlinearity(group_norm(block.norm2, t, ctx.prepared))
        t = block.conv2(block.dropout(t))
        if block.conv_shortcut is not None:
            x = block.conv_shortcut(x)
        # x is read over conv2's slab: crop both to the rows conv2 returns (same for stride-1 convs).
        return (x + t) / block.output_scale_factor

    t = add(rows_op(f"{prefix}.norm1", (h,), first, c1, "resnet", block.norm1))
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
