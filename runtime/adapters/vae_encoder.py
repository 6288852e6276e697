"""Adapter for the VAE *encode* of ``AutoencoderKL`` (SD) and ``AutoencoderKLTemporalDecoder`` (SVD,
whose encoder is the same 2-D ``Encoder``): one image is sliced along its rows, with halos.

A single image (SVD's conditioning image, fp32 in the pipeline) cannot be sliced along frames, so
every convolution stack is a rows unit (:mod:`.rows_blocks`); the mid block's self-attention over
the latent-resolution tokens stays one unsliced unit. The plan replaces ``vae.encode``.

Units (paths relative to the VAE): ``encoder.conv_in``; per down block its resnets' ``norm1`` and
``norm2`` and ``downsamplers.0``; the mid block's resnets (``norm1``/``norm2``) and
``attentions.0``; ``encoder.conv_norm_out`` (+ act + conv_out + ``quant_conv``).

Plan shape: ``encode`` takes images ``x: [N, 3, H, W]``; a call binds as ``batch=1, frames=N`` with
the *pixel* height and width as ``latent_height``/``latent_width`` (the sample this model sees).
The component is named ``vae_encoder`` (``list_units(vae, component="vae_encoder")``).
"""

from __future__ import annotations

import torch

from ...planner.errors import UnsupportedArgumentError, UnsupportedModelError
from ...planner.rows import RowMap
from ..program import Op, UnitSpec
from .base import CallBinding, example_maker, register
from .rows_blocks import conv_map, downsample2d, head, resnet2d, rows_op


class VAEEncoderAdapter:
    name = "vae-encoder"
    model_classes = ("AutoencoderKL", "AutoencoderKLTemporalDecoder")
    method = "encode"
    component = "vae_encoder"

    def ops(self, vae) -> tuple[list[Op], str]:
        enc = vae.encoder
        ops: list[Op] = []

        def add(op: Op) -> str:
            ops.append(op)
            return op.output

        h = add(rows_op("encoder.conv_in", ("x",), lambda ctx, x: enc.conv_in(x), RowMap.of(conv_map(enc.conv_in)),
                        "conv"))
        for i, block in enumerate(enc.down_blocks):
            if type(block).__name__ != "DownEncoderBlock2D":
                raise UnsupportedModelError(
                    f"encoder down block {i} is a {type(block).__name__}; vramplan supports DownEncoderBlock2D.")
            for j, res in enumerate(block.resnets):
                h = resnet2d(add, f"encoder.down_blocks.{i}.resnets.{j}", res, h)
            for u, down in enumerate(block.downsamplers or []):
                h = downsample2d(add, f"encoder.down_blocks.{i}.downsamplers.{u}", down, h)
        mid = enc.mid_block
        h = resnet2d(add, "encoder.mid_block.resnets.0", mid.resnets[0], h)
        for j, (attn, res) in enumerate(zip(mid.attentions, mid.resnets[1:])):  # noqa: B905 - as diffusers
            if attn is not None:
                name = f"encoder.mid_block.attentions.{j}"
                h = add(Op(UnitSpec(name, None, kind="attention"), (h,), name, lambda ctx, x, m=attn: m(x)))
            h = resnet2d(add, f"encoder.mid_block.resnets.{j + 1}", res, h)
        quant = getattr(vae, "quant_conv", None)
        if quant is not None and quant.kernel_size[0] != 1:
            raise UnsupportedModelError("a quant_conv wider than 1x1 has no rows lowering")
        h = head(add, "encoder.conv_norm_out", enc.conv_norm_out, enc.conv_act, enc.conv_out, h, after=quant)
        return ops, h

    def bind(self, vae, x: torch.Tensor, return_dict: bool = True) -> CallBinding:
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if x.dim() != 4:
            raise UnsupportedArgumentError(
                f"{type(vae).__name__}.encode under a plan takes images [N, C, H, W]; got shape {tuple(x.shape)}.")
        channels = vae.encoder.conv_in.in_channels
        if x.shape[1] != channels:
            raise UnsupportedArgumentError(
                f"{type(vae).__name__}.encode takes {channels}-channel images; got {x.shape[1]} channels "
                f"(shape {tuple(x.shape)}).")
        tile = getattr(vae, "tile_sample_min_size", None)
        if getattr(vae, "use_tiling", False) and tile is not None and max(x.shape[-2:]) > tile:
            raise UnsupportedArgumentError(
                f"vae.use_tiling is set and images of {x.shape[-2]}x{x.shape[-1]} exceed its tile size ({tile}): "
                f"tiled encoding blends tiles and changes the latents, which a plan cannot reproduce exactly. "
                f"Call vae.disable_tiling() and let the plan save the memory.")

        def finish(h: torch.Tensor):
            posterior = DiagonalGaussianDistribution(h)
            return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

        return CallBinding(
            env={"x": x}, layouts={"x": "nchw"}, globals={}, finish=finish,
            shape={"batch": 1, "frames": x.shape[0], "latent_height": x.shape[-2], "latent_width": x.shape[-1],
                   "dtype": x.dtype},
        )

    def example_inputs(self, vae, shape, device="cpu", seed: int = 0) -> tuple:
        size = (shape.batch * shape.frames, vae.encoder.conv_in.in_channels, shape.latent_height, shape.latent_width)
        return (example_maker(vae, device, seed)(*size),)


register(VAEEncoderAdapter())
