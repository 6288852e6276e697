"""Adapter for Stable Diffusion's ``AutoencoderKL`` decoder (AnimateDiff decodes its frames with it).

The decoder is purely per image: its convs, GroupNorms and mid-block self-attention each see one
image. Two lowerings, both equal to the stock decode:

- the default (``component="vae"``, :class:`SDVAEDecoderAdapter`): every unit slices along frames (the
  batch dimension of ``z``, ``B*T`` images). Units (module paths relative to the ``AutoencoderKL``):
  ``post_quant_conv`` (+ ``decoder.conv_in``; named ``decoder.conv_in`` when the model has no post-quant
  conv); the mid block's ``resnets.N`` and ``attentions.N``; per up block its ``resnets.J`` (and
  ``attentions.J`` for ``AttnUpDecoderBlock2D``) and ``upsamplers.0``; ``decoder.conv_norm_out`` (+ act +
  conv_out).
- rows (``component="vae_rows"``, :class:`SDVAERowsDecoderAdapter`): the convolution stacks slice along
  **rows** with halos (:mod:`.rows_blocks`, run by :mod:`vramplan.runtime.rows`; every image at once, a
  range of rows plus the halo its convs need, GroupNorm with statistics over each whole image, merged), so
  a single image need not be whole at the output resolution; the self-attention units run per image
  along frames. Units: ``post_quant_conv`` (when the model has one) and ``decoder.conv_in`` apart (each
  its own block); per ``ResnetBlock2D`` ``<path>.norm1`` (norm1 + act + conv1) and ``<path>.norm2``
  (norm2 + act + conv2 + shortcut); ``attentions.N`` (frames); ``upsamplers.0`` (nearest 2x + conv);
  ``decoder.conv_norm_out``. Not the default: a video's frames are a cheaper axis (no halos, no
  statistics passes) as long as one frame fits (docs/design.md, "The rows axis").

The plan replaces ``vae.decode``. Plan shape: ``decode`` sees a flat batch of latents ``z: [N, C, h, w]`` and cannot tell videos from
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
from ...planner.rows import RowMap
from ..program import Op
from .base import CallBinding, example_maker, register
from .rows_blocks import conv_map, head, resnet2d, rows_op, upsample2d
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
            attentions = _up_block_attentions(block, i)
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


class SDVAERowsDecoderAdapter(SDVAEDecoderAdapter):
    """The decode sliced along rows (``component="vae_rows"``): a second adapter, not the class's default."""

    name = "sd-vae-decoder-rows"
    component = "vae_rows"

    def ops(self, vae) -> tuple[list[Op], str]:
        return _rows_ops(vae)


def _up_block_attentions(block, i: int):
    """An up block's attentions (None for an ``UpDecoderBlock2D``); refuses a block vramplan does not lower."""
    kind = type(block).__name__
    if kind not in _UP_BLOCKS:
        raise UnsupportedModelError(
            f"AutoencoderKL decoder up block {i} is a {kind}; vramplan supports {', '.join(_UP_BLOCKS)}."
        )
    return getattr(block, "attentions", None)


def _rows_ops(vae) -> tuple[list[Op], str]:
    """The rows lowering (:class:`SDVAERowsDecoderAdapter`)."""
    dec = vae.decoder
    ops: list[Op] = []

    def add(op: Op) -> str:
        ops.append(op)
        return op.output

    # post_quant_conv and decoder.conv_in are separate units: each is its own module (a streamed or
    # offloaded block), so a unit never calls a module of another block.
    h = "z"
    pqc = vae.post_quant_conv
    if pqc is not None:
        h = add(rows_op("post_quant_conv", (h,), lambda ctx, x: pqc(x), RowMap.of(conv_map(pqc)), "conv"))
    h = add(rows_op("decoder.conv_in", (h,), lambda ctx, x: dec.conv_in(x), RowMap.of(conv_map(dec.conv_in)),
                    "conv"))

    mid = dec.mid_block
    h = resnet2d(add, "decoder.mid_block.resnets.0", mid.resnets[0], h)
    for j, (attn, res) in enumerate(zip(mid.attentions, mid.resnets[1:])):  # noqa: B905 - as diffusers
        if attn is not None:  # mid_block_add_attention=False leaves None here
            h = add(frames_op(f"decoder.mid_block.attentions.{j}", (h,), lambda ctx, x, m=attn: m(x),
                              kind="attention"))
        h = resnet2d(add, f"decoder.mid_block.resnets.{j + 1}", res, h)

    for i, block in enumerate(dec.up_blocks):
        attentions = _up_block_attentions(block, i)
        for j, res in enumerate(block.resnets):
            prefix = f"decoder.up_blocks.{i}"
            h = resnet2d(add, f"{prefix}.resnets.{j}", res, h)
            if attentions is not None:
                h = add(frames_op(f"{prefix}.attentions.{j}", (h,), lambda ctx, x, m=attentions[j]: m(x),
                                  kind="attention"))
        for u, up in enumerate(block.upsamplers or []):
            h = upsample2d(add, f"decoder.up_blocks.{i}.upsamplers.{u}", up, h)

    h = head(add, "decoder.conv_norm_out", dec.conv_norm_out, dec.conv_act, dec.conv_out, h)
    return ops, h


register(SDVAEDecoderAdapter())  # the default (first registered): frames
register(SDVAERowsDecoderAdapter())
