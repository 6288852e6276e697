"""Adapter for SVD's ``AutoencoderKLTemporalDecoder``: decode every frame in one pass, exactly.

diffusers' ``decode_chunk_size`` saves memory by decoding clips of frames, which changes the
video (the decoder's temporal layers then see fewer frames). Here the decoder's spatial units are
sliced along frames and its temporal units along pixels/tokens with GroupNorm statistics over all
frames, so the output equals decoding all frames at once. The plan replaces ``vae.decode``.

Units: ``decoder.conv_in``; the mid block's ``SpatioTemporalResBlock``s and ``attentions.0``
(per-frame self-attention); per up block its res blocks and ``upsamplers.0``;
``decoder.conv_norm_out`` (+ act + conv_out, per frame); ``decoder.time_conv_out`` (a temporal
conv at full resolution: tokens).
"""

from __future__ import annotations

import itertools

import torch

from ..program import Op, SliceCtx, UnitSpec
from .base import CallBinding, example_maker, register
from .spatiotemporal import _from_video, _to_video, frames_op, resnet


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


register(SVDTemporalDecoderAdapter())
