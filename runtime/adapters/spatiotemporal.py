"""Lowering of the spatio-temporal building blocks shared by SVD's UNet and its temporal VAE decoder.

``SpatioTemporalResBlock`` becomes a spatial unit (``ResnetBlock2D``, frames) and two temporal
units (tokens): ``norm1`` (GroupNorm over time with statistics from all tokens, conv1, + temb)
and ``norm2`` (the same for norm2, conv2, shortcut and the ``AlphaBlender``). ``Upsample2D`` and
other per-frame modules are frames units.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..norm import merged_moments, normalize_groups
from ..program import Op, SliceCtx, UnitSpec


def frames_op(name, inputs, fn, layout="nchw", kind="") -> Op:
    return Op(UnitSpec(name, "frames", kind=kind), tuple(inputs), name, fn, layout)


def resnet(add, prefix: str, block, inputs: tuple[str, ...], cast_to: torch.dtype | None = None) -> str:
    """SpatioTemporalResBlock -> spatial unit (frames) + two temporal units (tokens).

    ``cast_to`` converts the input first (the temporal VAE decoder casts to its up blocks' dtype).
    """
    spatial = block.spatial_res_block

    def spatial_fn(ctx: SliceCtx, x, skip=None):
        if cast_to is not None:
            x = x.to(cast_to)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        emb = ctx.globals.get("emb")
        return spatial(x, emb[ctx.start : ctx.stop] if emb is not None else None)

    xs = add(frames_op(f"{prefix}.spatial_res_block", inputs, spatial_fn, kind="resnet"))
    temporal = block.temporal_res_block
    h1 = add(_temporal_conv1(f"{prefix}.temporal_res_block.norm1", temporal, xs))
    return add(_temporal_conv2(f"{prefix}.temporal_res_block.norm2", temporal, block.time_mixer, h1, xs))


def _to_video(x: torch.Tensor, ctx: SliceCtx) -> torch.Tensor:
    """A token slice ``[B*T, C, n]`` as the 5-D ``[B, C, T, 1, n]`` the temporal convs expect (their kernels
    are 1 in space, so any split of the tokens computes the same; PyTorch's CPU conv3d is ~1.4x slower on
    ``[.., n, 1]`` than on ``[.., 1, n]``)."""
    b, t = ctx.globals["batch"], ctx.globals["frames"]
    return x.reshape(b, t, x.shape[1], x.shape[2]).permute(0, 2, 1, 3).unsqueeze(3)


def _from_video(x: torch.Tensor) -> torch.Tensor:
    b, c, t, _, n = x.shape
    return x.squeeze(3).permute(0, 2, 1, 3).reshape(b * t, c, n)


def _time_stats(norm: torch.nn.GroupNorm):
    """``prepare`` hook: GroupNorm moments over (channels in group, time, all tokens), merged from the
    token slices ``[B*T, C, n]`` of the input that the executor hands over one by one (read from a
    full value, or recomputed slice by slice: see ``Op.prepare``)."""

    def prepare(ctx: SliceCtx, pieces: Iterable[torch.Tensor]):
        b, t, g = ctx.globals["batch"], ctx.globals["frames"], norm.num_groups
        grouped = (p.reshape(b, t, g, p.shape[1] // g, p.shape[2]) for p in pieces)
        return merged_moments(grouped, reduce_dims=(1, 3, 4))

    return prepare


def _group_norm(norm: torch.nn.GroupNorm, x: torch.Tensor, stats) -> torch.Tensor:
    if stats is None:  # the whole input, statistics not prepared (Op.self_stats): the stock module
        return norm(x)
    mean, var = stats
    return normalize_groups(x, mean, var, norm.num_groups, norm.eps, norm.weight, norm.bias)


def _temporal_conv1(name: str, block, xs: str) -> Op:
    def fn(ctx: SliceCtx, x):
        h = block.nonlinearity(_group_norm(block.norm1, _to_video(x, ctx), ctx.prepared))
        h = block.conv1(h)
        if block.time_emb_proj is not None:
            temb = ctx.globals["emb"].reshape(ctx.globals["batch"], ctx.globals["frames"], -1)
            temb = block.time_emb_proj(block.nonlinearity(temb))[:, :, :, None, None].permute(0, 2, 1, 3, 4)
            h = h + temb
        return _from_video(h)

    return Op(UnitSpec(name, "tokens", True, kind="temporal_conv"), (xs,), name, fn, "nchw", _time_stats(block.norm1),
              self_stats=True)


def _temporal_conv2(name: str, block, mixer, h1: str, xs: str) -> Op:
    def fn(ctx: SliceCtx, h, x):
        h = block.nonlinearity(_group_norm(block.norm2, _to_video(h, ctx), ctx.prepared))
        h = block.conv2(block.dropout(h))
        x = _to_video(x, ctx)
        shortcut = block.conv_shortcut(x) if block.conv_shortcut is not None else x
        out = mixer(x_spatial=x, x_temporal=shortcut + h, image_only_indicator=ctx.globals["indicator"])
        return _from_video(out)

    return Op(UnitSpec(name, "tokens", True, kind="temporal_conv"), (h1, xs), name, fn, "nchw", _time_stats(block.norm2),
              self_stats=True)


def upsampler(name: str, module, h: str, next_skip: str) -> Op:
    def fn(ctx: SliceCtx, x):
        size = ctx.shapes[next_skip][2:] if ctx.globals["forward_upsample_size"] else None
        return module(x, size)

    return Op(UnitSpec(name, "frames", kind="up"), (h,), name, fn, "nchw")


