"""Adapter for the Wan VAE decode (``AutoencoderKLWan``: Wan 2.1 z16 and Wan 2.2 z48), exact.

The stock decode runs one latent frame at a time through the whole decoder with a causal feature
cache (the last two input frames of every causal conv) and grows its output by ``torch.cat``:
at 720p that cache and the output are most of its memory. Everything in the decoder is local in
space (3x3 causal convs, per-position RMS norms, nearest upsampling, pixel shuffles) except the mid
block's attention over a frame's tokens, so the decode is split in two units:

- ``decoder.mid_block`` (unsliced, latent resolution, small): ``post_quant_conv``, ``conv_in`` and
  the mid block, frame by frame with their own cache, written into one ``[B, C, T, h, w]`` value (a
  value between segments: the plan may place it in host memory);
- ``decoder.up_blocks`` (rows): the up blocks, ``norm_out``, ``conv_out`` (and Wan 2.2's unpatchify,
  and the clamp) on a slab of rows: **rows outer, frames inner** — each slice runs every latent
  frame in order through the stock modules with a feature cache of its own rows (alive during that
  slice only), cropping to the rows the next stage needs after each up block, and writes its frames
  into its own output, whose rows the executor writes into the preallocated video.

Each stock module sees exactly what it sees in the stock decode, restricted to a slab whose halo
covers its convolutions (:mod:`vramplan.planner.rows`): the result equals ``vae.decode``.

Plan shape: latents ``[B, C, T, h, w]`` (``sample_layout = "bcthw"``): ``frames`` are latent frames.
"""

from __future__ import annotations

import torch

from ...planner.errors import UnsupportedArgumentError, UnsupportedModelError
from ...planner.rows import CONV3, UP2, RowMap
from ..program import Op, SliceCtx, UnitSpec
from .base import CallBinding, example_maker, register

MID = "decoder.mid_block"


def _stage_maps(vae) -> list[RowMap]:
    """Row maps of the up blocks, then of the head (norm_out + conv_out, and unpatchify)."""
    dec = vae.decoder
    maps = []
    for block in dec.up_blocks:
        steps = [CONV3, CONV3] * len(block.resnets)  # each residual block: two 3x3(x3) causal convs
        up = getattr(block, "upsampler", None) or (block.upsamplers[0] if getattr(block, "upsamplers", None) else None)
        if up is not None:
            if up.mode not in ("upsample2d", "upsample3d"):
                raise UnsupportedModelError(f"Wan decoder upsampler mode {up.mode!r} has no rows lowering")
            steps += [UP2, CONV3]  # nearest(-exact) x2 then a 3x3 conv (a DupUp3D shortcut: the same rows)
        maps.append(RowMap(tuple(steps)))
    head = [CONV3]
    if vae.config.patch_size:
        head += [UP2] * (vae.config.patch_size.bit_length() - 1)
        if vae.config.patch_size & (vae.config.patch_size - 1):
            raise UnsupportedModelError(f"patch_size={vae.config.patch_size}: only powers of two have a row map")
    maps.append(RowMap(tuple(head)))
    return maps


class WanVAEDecoderAdapter:
    name = "wan-vae-decoder"
    model_classes = ("AutoencoderKLWan",)
    method = "decode"
    component = "vae"
    sample_layout = "bcthw"

    def ops(self, vae) -> tuple[list[Op], str]:
        dec = vae.decoder
        stages = _stage_maps(vae)
        whole = RowMap(tuple(s for m in stages for s in m.steps))

        def mid(ctx: SliceCtx, z):
            b, _, t, h, w = z.shape
            cache: list = [None] * (1 + 2 * len(dec.mid_block.resnets))
            out = None
            z = vae.post_quant_conv(z)  # as the stock decode: once, on every frame (a 1x1x1 conv)
            for i in range(t):
                idx = [1]
                x = z[:, :, i : i + 1]
                c = x[:, :, -2:].clone()
                if c.shape[2] < 2 and cache[0] is not None:
                    c = torch.cat([cache[0][:, :, -1:].to(c.device), c], dim=2)
                x = dec.conv_in(x, cache[0])
                cache[0] = c
                x = dec.mid_block(x, feat_cache=cache, feat_idx=idx)
                if out is None:
                    out = x.new_empty(b, x.shape[1], t, h, w)
                out[:, :, i : i + 1] = x
                del x
            return out

        def up(ctx: SliceCtx, x):
            return _up_slab(vae, stages, ctx, x)

        mid_spec = UnitSpec("decoder.mid_block", None, kind="attention")
        up_spec = UnitSpec("decoder.up_blocks", "rows", kind="conv")
        ops = [
            Op(mid_spec, ("z",), mid_spec.name, mid),
            Op(up_spec, (mid_spec.name,), up_spec.name, up, rows=whole, rows_cropped=True),
        ]
        return ops, up_spec.name

    def bind(self, vae, z: torch.Tensor, return_dict: bool = True) -> CallBinding:
        from diffusers.models.autoencoders.vae import DecoderOutput

        if z.dim() != 5:
            raise UnsupportedArgumentError(
                f"AutoencoderKLWan.decode takes latents [B, C, T, h, w]; got shape {tuple(z.shape)}.")
        if z.shape[1] != vae.config.z_dim:
            raise UnsupportedArgumentError(
                f"this AutoencoderKLWan decodes {vae.config.z_dim}-channel latents (z_dim); got {z.shape[1]} channels "
                f"(shape {tuple(z.shape)}: [B, C, T, h, w]).")
        if getattr(vae, "use_tiling", False):
            raise UnsupportedArgumentError(
                "vae.use_tiling is set: tiled decoding blends tiles and changes the video, which a plan cannot "
                "reproduce exactly. Call vae.disable_tiling() and let the plan save the memory.")

        def finish(out: torch.Tensor):
            return DecoderOutput(sample=out) if return_dict else (out,)

        return CallBinding(
            env={"z": z}, layouts={"z": "nchw"}, globals={}, finish=finish,
            shape={"batch": z.shape[0], "frames": z.shape[2], "latent_height": z.shape[-2],
                   "latent_width": z.shape[-1], "dtype": z.dtype},
        )

    def example_inputs(self, vae, shape, device="cpu", seed: int = 0) -> tuple:
        size = (shape.batch, vae.config.z_dim, shape.frames, shape.latent_height, shape.latent_width)
        return (example_maker(vae, device, seed)(*size),)


def _up_slab(vae, stages: list[RowMap], ctx: SliceCtx, x: torch.Tensor) -> torch.Tensor:
    """Output rows ``[ctx.start, ctx.stop)`` of every frame from a slab of the mid block's output:
    latent frames in order through the stock up blocks and head, with this slab's own feature
    cache; after each stage the rows the next stage needs."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

    dec = vae.decoder
    # rows needed at each stage's input (the last entry: the output rows), walking backwards
    need = [(ctx.start, ctx.stop)]
    full = [ctx.shapes[MID][-2]]
    for m in stages:
        full.append(m.out_len(full[-1]))
    for j in range(len(stages) - 1, -1, -1):
        need.insert(0, stages[j].needs(*need[0], full[j]))
    a0 = need[0][0]
    if x.shape[-2] != need[0][1] - a0:
        raise RuntimeError(f"Wan up blocks: a slab of {x.shape[-2]} rows, expected rows {need[0]}")
    b, _, t, _, _ = x.shape
    cache: list = [None] * (1 + sum(isinstance(m, WanCausalConv3d) for m in dec.up_blocks.modules()))
    later = 2 ** sum(getattr(m, "mode", None) == "upsample3d" for m in dec.up_blocks.modules())
    out = None
    frame = 0
    for i in range(t):
        idx = [0]
        h = x[:, :, i : i + 1]
        have = a0
        for j, block in enumerate(dec.up_blocks):
            h = block(h, feat_cache=cache, feat_idx=idx, first_chunk=i == 0)
            start = stages[j].start(have)
            lo, hi = need[j + 1]
            h = h.narrow(-2, lo - start, hi - lo)
            have = lo
        h = dec.nonlinearity(dec.norm_out(h))
        c = h[:, :, -2:].clone()
        if c.shape[2] < 2 and cache[idx[0]] is not None:
            c = torch.cat([cache[idx[0]][:, :, -1:].to(c.device), c], dim=2)
        h = dec.conv_out(h, cache[idx[0]])
        cache[idx[0]] = c
        if vae.config.patch_size is not None:
            h = unpatchify(h, patch_size=vae.config.patch_size)
        start = stages[-1].start(have)
        lo, hi = ctx.start, ctx.stop
        h = torch.clamp(h.narrow(-2, lo - start, hi - lo), min=-1.0, max=1.0)
        if out is None:
            out = h.new_empty(b, h.shape[1], h.shape[2] + later * (t - 1), hi - lo, h.shape[-1])
        out[:, :, frame : frame + h.shape[2]] = h
        frame += h.shape[2]
        del h
    if frame != out.shape[2]:
        raise RuntimeError(f"Wan up blocks made {frame} frames, expected {out.shape[2]}")
    return out


register(WanVAEDecoderAdapter())
