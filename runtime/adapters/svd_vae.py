"""Adapter for SVD's ``AutoencoderKLTemporalDecoder``: decode every frame in one pass, exactly.

diffusers' ``decode_chunk_size`` saves memory by decoding clips of frames, which changes the
video (the decoder's temporal layers then see fewer frames). Here the temporal units slice along
pixels/tokens with GroupNorm statistics over all frames and positions, so the output equals decoding
all frames at once. The plan replaces ``vae.decode``. Two lowerings of the spatial units:

- the default (``component="vae"``): along frames. Units: ``decoder.conv_in``; the mid block's
  ``SpatioTemporalResBlock``s (``spatial_res_block``, frames; ``temporal_res_block.norm1``/``.norm2``,
  tokens) and ``attentions.0`` (per-frame self-attention, frames); per up block its res blocks and
  ``upsamplers.0``; ``decoder.conv_norm_out`` (+ act + conv_out, per frame); ``decoder.time_conv_out`` (a
  (3, 1, 1) temporal conv at full resolution: tokens).
- rows (``component="vae_rows"``): the spatial convolution stacks along **rows** with halos
  (:mod:`.rows_blocks`: every frame at once, GroupNorm statistics over each frame's whole height, merged),
  so no frame need be whole at the output resolution: ``decoder.conv_in``, each
  ``spatial_res_block.norm1``/``.norm2``, ``upsamplers.0`` and ``decoder.conv_norm_out`` are rows units;
  the temporal units, the attention and ``time_conv_out`` as in the default. Not the default: frames are
  the cheaper axis (no halos, no statistics passes) as long as one frame fits.
"""

from __future__ import annotations

import itertools

import torch

from ...planner.rows import RowMap
from ..program import Op, SliceCtx, UnitSpec
from .base import CallBinding, example_maker, register
from .rows_blocks import conv_map, head, resnet2d, rows_op, upsample2d
from .spatiotemporal import _from_video, _temporal_conv1, _temporal_conv2, _to_video, frames_op, resnet


def _rows_resnet(add, prefix: str, block, h: str, cast_to: torch.dtype | None = None) -> str:
    """``SpatioTemporalResBlock``: its ``ResnetBlock2D`` as two rows units (``spatial_res_block.norm1``,
    ``.norm2``), its ``TemporalResnetBlock`` (+ the ``AlphaBlender``) as the two tokens units of
    :mod:`.spatiotemporal` (GroupNorm over all frames and positions, a (3, 1, 1) conv: per position)."""
    xs = resnet2d(add, f"{prefix}.spatial_res_block", block.spatial_res_block, h, cast_to=cast_to)
    temporal = block.temporal_res_block
    h1 = add(_temporal_conv1(f"{prefix}.temporal_res_block.norm1", temporal, xs))
    return add(_temporal_conv2(f"{prefix}.temporal_res_block.norm2", temporal, block.time_mixer, h1, xs))


class SVDTemporalDecoderAdapter:
    name = "svd-vae-decoder"
    model_classes = ("AutoencoderKLTemporalDecoder",)
    method = "decode"
    component = "vae"

    def ops(self, vae) -> tuple[list[Op], str]:
        dec = vae.decoder
        ops: list[Op] = []

        def add(op: Op) -> str:
            ops.append(op)
            return op.output

        h = add(frames_op("decoder.conv_in", ("z",), lambda ctx, x: dec.conv_in(x), kind="conv"))
        mid = dec.mid_block
        h = resnet(add, "decoder.mid_block.resnets.0", mid.resnets[0], (h,))
        for j, (attn, block) in enumerate(zip(mid.attentions, mid.resnets[1:])):  # noqa: B905 - as diffusers
            h = add(frames_op(f"decoder.mid_block.attentions.{j}", (h,), lambda ctx, x, m=attn: m(x), kind="attention"))
            h = resnet(add, f"decoder.mid_block.resnets.{j + 1}", block, (h,))
        upscale_dtype = next(itertools.chain(dec.up_blocks.parameters(), dec.up_blocks.buffers())).dtype
        for i, block in enumerate(dec.up_blocks):
            for j, res in enumerate(block.resnets):
                cast = upscale_dtype if (i, j) == (0, 0) else None
                h = resnet(add, f"decoder.up_blocks.{i}.resnets.{j}", res, (h,), cast_to=cast)
            if block.upsamplers is not None:
                up = block.upsamplers[0]
                h = add(frames_op(f"decoder.up_blocks.{i}.upsamplers.0", (h,), lambda ctx, x, m=up: m(x), kind="up"))

        def head(ctx, x):
            return dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))

        h = add(frames_op("decoder.conv_norm_out", (h,), head, kind="conv"))

        def time_conv(ctx: SliceCtx, x):
            return _from_video(dec.time_conv_out(_to_video(x, ctx)))

        spec = UnitSpec("decoder.time_conv_out", "tokens", kind="temporal_conv")
        h = add(Op(spec, (h,), spec.name, time_conv, "nchw"))
        return ops, h

    def bind(self, vae, z: torch.Tensor, num_frames: int, return_dict: bool = True) -> CallBinding:
        from diffusers.models.autoencoders.vae import DecoderOutput

        batch = z.shape[0] // num_frames
        indicator = torch.zeros(batch, num_frames, dtype=z.dtype, device=z.device)

        def finish(out: torch.Tensor):
            return DecoderOutput(sample=out) if return_dict else (out,)

        return CallBinding(
            env={"z": z},
            layouts={"z": "nchw"},
            globals={"batch": batch, "frames": num_frames, "indicator": indicator, "emb": None},
            finish=finish,
            shape={
                "batch": batch,
                "frames": num_frames,
                "latent_height": z.shape[-2],
                "latent_width": z.shape[-1],
                "dtype": z.dtype,
            },
        )

    def example_inputs(self, vae, shape, device="cpu", seed: int = 0) -> tuple:
        size = (shape.batch * shape.frames, vae.config.latent_channels, shape.latent_height, shape.latent_width)
        z = example_maker(vae, device, seed)(*size)
        return z, shape.frames


class SVDRowsTemporalDecoderAdapter(SVDTemporalDecoderAdapter):
    """The decode with its spatial units along rows (``component="vae_rows"``): not the class's default."""

    name = "svd-vae-decoder-rows"
    component = "vae_rows"

    def ops(self, vae) -> tuple[list[Op], str]:
        return _rows_ops(vae)


def _rows_ops(vae) -> tuple[list[Op], str]:
    """The rows lowering (:class:`SVDRowsTemporalDecoderAdapter`)."""
    dec = vae.decoder
    ops: list[Op] = []

    def add(op: Op) -> str:
        ops.append(op)
        return op.output

    conv_in = RowMap.of(conv_map(dec.conv_in))
    h = add(rows_op("decoder.conv_in", ("z",), lambda ctx, x: dec.conv_in(x), conv_in, "conv"))
    mid = dec.mid_block
    h = _rows_resnet(add, "decoder.mid_block.resnets.0", mid.resnets[0], h)
    for j, (attn, block) in enumerate(zip(mid.attentions, mid.resnets[1:])):  # noqa: B905 - as diffusers
        h = add(frames_op(f"decoder.mid_block.attentions.{j}", (h,), lambda ctx, x, m=attn: m(x), kind="attention"))
        h = _rows_resnet(add, f"decoder.mid_block.resnets.{j + 1}", block, h)
    upscale_dtype = next(itertools.chain(dec.up_blocks.parameters(), dec.up_blocks.buffers())).dtype
    for i, block in enumerate(dec.up_blocks):
        for j, res in enumerate(block.resnets):
            cast = upscale_dtype if (i, j) == (0, 0) else None
            h = _rows_resnet(add, f"decoder.up_blocks.{i}.resnets.{j}", res, h, cast_to=cast)
        if block.upsamplers is not None:
            h = upsample2d(add, f"decoder.up_blocks.{i}.upsamplers.0", block.upsamplers[0], h)
    h = head(add, "decoder.conv_norm_out", dec.conv_norm_out, dec.conv_act, dec.conv_out, h)

    def time_conv(ctx: SliceCtx, x):
        return _from_video(dec.time_conv_out(_to_video(x, ctx)))

    spec = UnitSpec("decoder.time_conv_out", "tokens", kind="temporal_conv")
    h = add(Op(spec, (h,), spec.name, time_conv, "nchw"))
    return ops, h


register(SVDTemporalDecoderAdapter())  # the default (first registered): frames and tokens
register(SVDRowsTemporalDecoderAdapter())
