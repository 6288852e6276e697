"""Adapter for Stable Diffusion's ``AutoencoderKL`` decoder (AnimateDiff decodes its frames with it).

The decoder is purely per image: its convs, GroupNorms and mid-block self-attention each see one
image, so every unit slices along frames (the batch dimension of ``z``, ``B*T`` images) and the
sliced decode equals the unsliced one. The plan replaces ``vae.decode``.

Units (module paths relative to the ``AutoencoderKL``): ``post_quant_conv`` (+ ``decoder.conv_in``;
named ``decoder.conv_in`` when the model has no post-quant conv); the mid block's
``resnets.N`` and ``attentions.N``; per up block its ``resnets.J`` (and ``attentions.J`` for
``AttnUpDecoderBlock2D``) and ``upsamplers.0``; ``decoder.conv_norm_out`` (+ act + conv_out).

Plan shape: ``decode`` sees a flat batch of latents ``z: [N, C, h, w]`` and cannot tell videos from
frames, so a call binds as ``batch=1, frames=N`` (AnimateDiff's ``B*T``). Make plans with that
shape: ``SampleShape(batch=1, frames=B*T, ...)``.

``vae.use_slicing`` (decode image by image) is honoured trivially: images are independent, so the
planned decode already gives its result, with the plan's own slicing deciding the memory.
``vae.use_tiling`` changes the output (tiles are blended) whenever diffusers would tile, so such a
call raises :class:`UnsupportedArgumentError`.
"""

from __future__ import annotations

import torch

from ...planner.errors import UnsupportedArgumentError, UnsupportedModelError
from ..program import Op
from .base import CallBinding, example_maker, register
from .spatiotemporal import frames_op

_UP_BLOCKS = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")


class SDVAEDecoderAdapter:
    name = "sd-vae-decoder"
    model_classes = ("AutoencoderKL",)
    method = "decode"
    component = "vae"

    def ops(self, vae) -> tuple[list[Op], str]:
        dec = vae.decoder
        ops: list[Op] = []

        def add(name: str, inputs: tuple[str, ...], fn, kind: str) -> str:
            ops.append(frames_op(name, inputs, fn, kind=kind))
            return name

        pqc = vae.post_quant_conv
        if pqc is not None:
            h = add("post_quant_conv", ("z",), lambda ctx, x: dec.conv_in(pqc(x)), "conv")
        else:
            h = add("decoder.conv_in", ("z",), lambda ctx, x: dec.conv_in(x), "conv")

        mid = dec.mid_block
        h = add("decoder.mid_block.resnets.0", (h,), lambda ctx, x, m=mid.resnets[0]: m(x, None), "resnet")
        for j, (attn, res) in enumerate(zip(mid.attentions, mid.resnets[1:])):  # noqa: B905 - as diffusers
            if attn is not None:  # mid_block_add_attention=False leaves None here
                h = add(f"decoder.mid_block.attentions.{j}", (h,), lambda ctx, x, m=attn: m(x), "attention")
            h = add(f"decoder.mid_block.resnets.{j + 1}", (h,), lambda ctx, x, m=res: m(x, None), "resnet")

        for i, block in enumerate(dec.up_blocks):
            kind = type(block).__name__
            if kind not in _UP_BLOCKS:
                raise UnsupportedModelError(
                    f"AutoencoderKL decoder up block {i} is a {kind}; vramplan supports {', '.join(_UP_BLOCKS)}."
                )
            attentions = getattr(block, "attentions", None)
            for j, res in enumerate(block.resnets):
                prefix = f"decoder.up_blocks.{i}"
                h = add(f"{prefix}.resnets.{j}", (h,), lambda ctx, x, m=res: m(x, temb=None), "resnet")
                if attentions is not None:
                    h = add(f"{prefix}.attentions.{j}", (h,), lambda ctx, x, m=attentions[j]: m(x), "attention")
            if block.upsamplers is not None:
                for u, up in enumerate(block.upsamplers):
                    h = add(f"decoder.up_blocks.{i}.upsamplers.{u}", (h,), lambda ctx, x, m=up: m(x), "up")

        def head(ctx, x):
            return dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))

        h = add("decoder.conv_norm_out", (h,), head, "conv")
        return ops, h

    def bind(self, vae, z: torch.Tensor, return_dict: bool = True, generator=None) -> CallBinding:
        from diffusers.models.autoencoders.vae import DecoderOutput

        if getattr(vae, "use_tiling", False) and (
            z.shape[-1] > vae.tile_latent_min_size or z.shape[-2] > vae.tile_latent_min_size
        ):
            raise UnsupportedArgumentError(
                f"vae.use_tiling is set and latents of {z.shape[-2]}x{z.shape[-1]} exceed its tile size "
                f"({vae.tile_latent_min_size}): tiled decoding blends tiles and changes the output, which a "
                f"plan cannot reproduce exactly. Call vae.disable_tiling() and let the plan save the memory."
            )
        if z.dim() != 4:
            raise UnsupportedArgumentError(
                f"AutoencoderKL.decode under a plan takes latents [N, C, h, w]; got shape {tuple(z.shape)}."
            )

        def finish(out: torch.Tensor):
            return DecoderOutput(sample=out) if return_dict else (out,)

        return CallBinding(
            env={"z": z},
            layouts={"z": "nchw"},
            globals={},
            finish=finish,
            shape={
                "batch": 1,
                "frames": z.shape[0],
                "latent_height": z.shape[-2],
                "latent_width": z.shape[-1],
                "dtype": z.dtype,
            },
        )

    def example_inputs(self, vae, shape, device="cpu", seed: int = 0) -> tuple:
        size = (shape.batch * shape.frames, vae.config.latent_channels, shape.latent_height, shape.latent_width)
        z = example_maker(vae, device, seed)(*size)
        return (z,)


register(SDVAEDecoderAdapter())
