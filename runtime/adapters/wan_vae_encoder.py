"""Adapter for the Wan VAE *encode* (``AutoencoderKLWan.encode``: Wan 2.1 z16 and Wan 2.2 z48), exact.

The stock encode runs the first frame, then chunks of 4 frames, through the whole encoder with a
causal feature cache (the last frames of every causal conv's input, and each temporal
downsampler's last frame) and grows its output by ``torch.cat``. At 720p the cache and the
full-resolution activations are its memory. Everything before the encoder's mid block is local in
space (Wan 2.2's 2x2 patchify, 3x3 causal convs, per-position RMS norms, stride-2 3x3 downsampling
convs after a one-row zero pad, Wan 2.2's 2x2 average shortcuts); the mid block attends over a
frame's tokens. So the encode is two units:

- ``encoder.down_blocks`` (rows): patchify, ``conv_in`` and the down blocks on a slab of rows —
  **rows outer, chunks inner**: each slice runs the chunks (1, 4, 4, ... frames) in the stock order
  through the stock modules with a feature cache of its own rows (alive during that slice only),
  cropping after every convolution to the rows the rest needs; its latent rows are written into a
  preallocated ``[B, C, T_latent, h, w]`` value;
- ``encoder.mid_block`` (unsliced, latent resolution): the mid block (attention over each frame's
  tokens), ``norm_out``, ``conv_out`` chunk by chunk with their own cache, written into a
  preallocated output, then ``quant_conv``.

Plan shape (component ``vae_encoder``, method ``encode``, layout ``[B, C, T, H, W]``): ``batch`` B,
``frames`` the *video* frames (4n+1), ``latent_height``/``latent_width`` the *pixel* height and width
(the sample this model sees, as for the SD/SVD encoders of :mod:`.vae_encoder`).
"""

from __future__ import annotations

import torch

from ...planner.errors import UnsupportedArgumentError, UnsupportedModelError
from ...planner.rows import RowMap, RowStep
from ..program import Op, SliceCtx, UnitSpec
from .base import CallBinding, example_maker, register
from .wan_vae import _cached_conv, _Rows, conv_step, cropped_residual

DOWN = "encoder.down_blocks"
MID = "encoder.mid_block"
DOWN2 = RowStep(kernel=3, stride=2, pad=0, pad_end=1)  # ZeroPad2d((0, 1, 0, 1)) then a 3x3 stride-2 conv


def chunks(frames: int) -> list[tuple[int, int]]:
    """The stock encode's frame chunks: the first frame, then 4 at a time."""
    return [(0, 1)] + [(1 + 4 * i, 5 + 4 * i) for i in range((frames - 1) // 4)]


def _layers(vae):
    """The encoder's down layers in order as (kind, module): ``res`` (a residual block), ``down`` (a
    resample), ``block`` (Wan 2.2's residual down block: resnets, a resample, an average shortcut)."""
    out = []
    for i, layer in enumerate(vae.encoder.down_blocks):
        kind = type(layer).__name__
        if kind == "WanResidualBlock":
            out.append(("res", layer))
        elif kind == "WanResample":
            if layer.mode not in ("downsample2d", "downsample3d"):
                raise UnsupportedModelError(f"Wan encoder resample mode {layer.mode!r} has no rows lowering")
            out.append(("down", layer))
        elif kind == "WanResidualDownBlock":
            out.append(("block", layer))
        else:  # WanAttentionBlock (attn_scales): attention over a frame's tokens at full resolution
            raise UnsupportedModelError(
                f"Wan encoder down layer {i} is a {kind}; vramplan slices Wan encoders without attention in "
                f"their down blocks (attn_scales=[], as every released Wan VAE).")
    return out


def _stage_maps(vae) -> list[RowMap]:
    """Row maps of the crop points, in order: patchify (2.2) + ``conv_in``; each residual block's conv1
    and conv2; each downsampler. Costs: conv weights x width x frames at that level (relative)."""
    patch = vae.config.patch_size or 1
    layers = _layers(vae)
    downs = sum(1 for kind, m in layers if kind == "down" or (kind == "block" and m.downsampler is not None))
    scale, frames = 2**downs, 4  # width and frames per chunk at this level (relative units)
    first = [RowStep(kernel=patch, stride=patch)] if patch > 1 else []
    maps = [RowMap((*first, conv_step(vae.encoder.conv_in, scale, frames)))]

    def res(block):
        for conv in (block.conv1, block.conv2):
            maps.append(RowMap.of(conv_step(conv, scale, frames)))

    def down(resample):
        nonlocal scale, frames
        w = resample.resample[1].weight
        maps.append(RowMap.of(DOWN2.with_cost(w.numel() * scale * frames // 2, (w.shape[0] + w.shape[1]) * scale * frames)))
        scale //= 2
        frames //= 2 if resample.mode == "downsample3d" else 1

    for kind, layer in layers:
        if kind == "res":
            res(layer)
        elif kind == "down":
            down(layer)
        else:
            for block in layer.resnets:
                res(block)
            if layer.downsampler is not None:
                down(layer.downsampler)
    return maps


class WanVAEEncoderAdapter:
    name = "wan-vae-encoder"
    model_classes = ("AutoencoderKLWan",)
    method = "encode"
    component = "vae_encoder"
    sample_layout = "bcthw"

    def ops(self, vae) -> tuple[list[Op], str]:
        enc = vae.encoder
        stages = _stage_maps(vae)
        whole = RowMap(tuple(s for m in stages for s in m.steps))

        def down(ctx: SliceCtx, x):
            return _down_slab(vae, stages, ctx, x)

        def mid(ctx: SliceCtx, h):
            b, _, t, hh, ww = h.shape
            n = 1 + 2 * len(enc.mid_block.resnets) + 1  # the mid block's convs and conv_out (indices from 1)
            cache: list = [None] * n
            out = None
            i = 0
            for f0 in _latent_chunks(vae, t):
                x = h[:, :, i : i + f0]
                idx = [0]
                x = enc.mid_block(x, feat_cache=cache, feat_idx=idx)
                x = _cached_conv(enc.conv_out, enc.nonlinearity(enc.norm_out(x)), cache, idx)
                if out is None:
                    out = x.new_empty(b, x.shape[1], t, hh, ww)
                out[:, :, i : i + f0] = x
                i += f0
                del x
            return vae.quant_conv(out)  # as the stock encode: once, on every latent frame (a 1x1x1 conv)

        down_spec = UnitSpec(DOWN, "rows", kind="conv")
        mid_spec = UnitSpec(MID, None, kind="attention")
        ops = [
            Op(down_spec, ("x",), DOWN, down, rows=whole, rows_cropped=True),
            Op(mid_spec, (DOWN,), MID, mid),
        ]
        return ops, MID

    def bind(self, vae, x: torch.Tensor, return_dict: bool = True) -> CallBinding:
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        check_video(vae, tuple(x.shape))
        if getattr(vae, "use_tiling", False):
            raise UnsupportedArgumentError(
                "vae.use_tiling is set: tiled encoding blends tiles and changes the latents, which a plan cannot "
                "reproduce exactly. Call vae.disable_tiling() and let the plan save the memory.")

        def finish(h: torch.Tensor):
            posterior = DiagonalGaussianDistribution(h)
            return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

        return CallBinding(
            env={"x": x}, layouts={"x": "nchw"}, globals={"device": x.device}, finish=finish,
            shape={"batch": x.shape[0], "frames": x.shape[2], "latent_height": x.shape[-2],
                   "latent_width": x.shape[-1], "dtype": x.dtype},
        )

    def input_channels(self, vae) -> int:
        return video_channels(vae)

    def check_input(self, vae, shape: tuple[int, ...]) -> None:
        check_video(vae, tuple(shape))

    def example_inputs(self, vae, shape, device="cpu", seed: int = 0) -> tuple:
        size = (shape.batch, video_channels(vae), shape.frames, shape.latent_height, shape.latent_width)
        return (example_maker(vae, device, seed)(*size),)


def video_channels(vae) -> int:
    """Channels of the video a Wan VAE encodes (Wan 2.2's ``in_channels`` count its 2x2 patch)."""
    patch = vae.config.patch_size or 1
    return vae.config.in_channels // (patch * patch)


def check_video(vae, shape: tuple[int, ...]) -> None:
    """Refuse a video the stock encode cannot take whole (or would cut silently): [B, C, T, H, W] with
    the VAE's channels, T = 4n+1 frames, H and W multiples of the spatial compression (Wan 2.2)."""
    channels = video_channels(vae)
    if len(shape) != 5:
        raise UnsupportedArgumentError(
            f"AutoencoderKLWan.encode takes a video [B, C, T, H, W]; got shape {shape}.")
    if shape[1] != channels:
        raise UnsupportedArgumentError(
            f"this AutoencoderKLWan encodes {channels}-channel videos; got {shape[1]} channels "
            f"(shape {shape}: [B, C, T, H, W]).")
    if (shape[2] - 1) % 4:
        raise UnsupportedArgumentError(
            f"AutoencoderKLWan.encode takes 4n+1 frames (the first, then chunks of 4); got {shape[2]} "
            f"(the stock encode drops the last {(shape[2] - 1) % 4} silently). Use {shape[2] - (shape[2] - 1) % 4} "
            f"or {shape[2] + 4 - (shape[2] - 1) % 4} frames.")
    ratio = spatial_ratio(vae) if vae.config.patch_size else 1
    if shape[-2] % ratio or shape[-1] % ratio:
        raise UnsupportedArgumentError(
            f"this AutoencoderKLWan encodes heights and widths that are multiples of {ratio}; got "
            f"{shape[-2]}x{shape[-1]}.")


def spatial_ratio(vae) -> int:
    """Pixels per latent row of the encoder (its patch times 2 per spatial downsampler), from the modules:
    ``config.scale_factor_spatial`` is not checked against them."""
    downs = sum(getattr(m, "mode", "").startswith("downsample") for m in vae.encoder.down_blocks.modules()
                if type(m).__name__ == "WanResample")
    return (vae.config.patch_size or 1) * 2**downs


def _temporal_downs(vae) -> int:
    return sum(getattr(m, "mode", None) == "downsample3d" for m in vae.encoder.down_blocks.modules())


def _latent_chunks(vae, t: int) -> list[int]:
    """Latent frames each stock chunk makes: 1 for the first frame, then 4 / 2^(temporal downsamples)."""
    per = 4 >> _temporal_downs(vae)
    return [1] + [per] * ((t - 1) // per)


def _down_slab(vae, stages: list[RowMap], ctx: SliceCtx, x: torch.Tensor) -> torch.Tensor:
    """Latent rows ``[ctx.start, ctx.stop)`` of every latent frame from a slab of the video's rows:
    the chunks in order through patchify, ``conv_in`` and the down layers (the stock modules), with
    this slab's own feature cache, cropped after every convolution to the rows the rest needs."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, patchify

    enc = vae.encoder
    walk = _Rows(stages, ctx.shapes["x"][-2], ctx.start, ctx.stop)
    a0, b0 = walk.need[0]
    whole = RowMap(tuple(s for m in stages for s in m.steps)).needs(ctx.start, ctx.stop, ctx.shapes["x"][-2])
    if not (whole[0] <= a0 and b0 <= whole[1] and x.shape[-2] == whole[1] - whole[0]):
        raise RuntimeError(f"Wan encoder: a slab of rows {whole} ({x.shape[-2]} rows) does not cover {walk.need[0]}")
    x = x.narrow(-2, a0 - whole[0], b0 - a0)
    cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in enc.modules())
    layers = _layers(vae)
    out = None
    frame = 0
    b = x.shape[0]
    t_out = 1 + (len(chunks(x.shape[2])) - 1) * (4 >> _temporal_downs(vae))
    idx = [0]  # the stock cache index, reset per chunk

    def res(block, h, have, point):
        return cropped_residual(block, walk, h, have, point, cache, idx)

    def down(resample, h, have, point):
        h = resample(h, feat_cache=cache, feat_idx=idx)
        h, have = walk.crop(h, point, have)
        return h, have, point + 1

    for c0, c1 in chunks(x.shape[2]):
        idx[0] = 0
        h = x[:, :, c0:c1]
        if vae.config.patch_size is not None:
            h = patchify(h, patch_size=vae.config.patch_size)
        h = _cached_conv(enc.conv_in, h, cache, idx)
        h, have = walk.crop(h, 0, a0)
        point = 1

        for kind, layer in layers:
            if kind == "res":
                h, have, point = res(layer, h, have, point)
            elif kind == "down":
                h, have, point = down(layer, h, have, point)
            else:  # Wan 2.2: resnets, a downsampler, + the average of the block input's 2x2 (x2 frames) cells
                block_in, block_have = h, have
                for block in layer.resnets:
                    h, have, point = res(block, h, have, point)
                if layer.downsampler is not None:
                    h, have, point = down(layer.downsampler, h, have, point)
                f = layer.avg_shortcut.factor_s
                shortcut = layer.avg_shortcut(block_in.narrow(-2, f * have - block_have, f * h.shape[-2]))
                h = h + shortcut
                del block_in, shortcut
        h = h.narrow(-2, ctx.start - have, ctx.stop - ctx.start)
        if out is None:
            out = h.new_empty(b, h.shape[1], t_out, h.shape[-2], h.shape[-1])
        out[:, :, frame : frame + h.shape[2]] = h
        frame += h.shape[2]
        del h
    if frame != out.shape[2]:
        raise RuntimeError(f"Wan encoder made {frame} latent frames, expected {out.shape[2]}")
    return out


register(WanVAEEncoderAdapter())
