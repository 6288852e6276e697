"""Adapter for ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion, SVD-XT).

Units, in execution order (module paths of the stock model):

- ``conv_in``, ``*.spatial_res_block``, ``*.attentions.N.proj_in`` (GroupNorm + proj_in),
  ``*.transformer_blocks.M``, ``*.attentions.N.proj_out`` (+ residual), down/upsamplers and
  ``conv_norm_out`` (+ act + conv_out) work frame by frame: sliced along frames (``B*T``).
- ``*.temporal_res_block.norm1`` (norm1, conv1, + temb) and ``*.temporal_res_block.norm2``
  (norm2, conv2, shortcut, ``time_mixer``) mix along time at each spatial position: sliced along
  tokens, with GroupNorm statistics over all tokens gathered first.
- ``*.temporal_transformer_blocks.M`` (+ frame position embedding + ``time_mixer``): tokens.

The up path's ``torch.cat`` of the skip connection happens inside the sliced spatial unit, so
the concatenated feature never exists at full size.
"""

from __future__ import annotations

import torch

from ..program import Op, SliceCtx, UnitSpec
from .base import CallBinding, example_maker, register
from .spatiotemporal import frames_op as _frames
from .spatiotemporal import resnet as _resnet
from .spatiotemporal import upsampler as _upsampler


class SVDUNetAdapter:
    name = "svd-unet"
    model_classes = ("UNetSpatioTemporalConditionModel",)
    method = "forward"
    component = "unet"
    # Streaming units finer than a top-level block (runtime.streaming.stream_block_of): each spatio-temporal
    # res block, transformer and resampler streams on its own, so the floor is not a whole up block plus
    # the next one (up_blocks.0 + up_blocks.1: 1.28 GiB at fp16).
    stream_parts = ("resnets", "attentions", "upsamplers", "downsamplers")

    # ------------------------------------------------------------------ program structure
    def ops(self, unet) -> tuple[list[Op], str]:
        ops: list[Op] = []

        def add(op: Op) -> str:
            ops.append(op)
            return op.output

        h = add(_frames("conv_in", ("sample",), lambda ctx, x: unet.conv_in(x), kind="conv"))
        skips = [h]
        for i, block in enumerate(unet.down_blocks):
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                h = _resnet(add, f"down_blocks.{i}.resnets.{j}", resnet, (h,))
                if attentions is not None:
                    h = _transformer(add, f"down_blocks.{i}.attentions.{j}", attentions[j], h)
                skips.append(h)
            if block.downsamplers is not None:
                ds = block.downsamplers[0]
                h = add(_frames(f"down_blocks.{i}.downsamplers.0", (h,), lambda ctx, x, m=ds: m(x), kind="down"))
                skips.append(h)

        mid = unet.mid_block
        h = _resnet(add, "mid_block.resnets.0", mid.resnets[0], (h,))
        for j, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:], strict=True)):
            h = _transformer(add, f"mid_block.attentions.{j}", attn, h)
            h = _resnet(add, f"mid_block.resnets.{j + 1}", resnet, (h,))

        for i, block in enumerate(unet.up_blocks):
            res = skips[-len(block.resnets) :]
            skips = skips[: -len(block.resnets)]
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                h = _resnet(add, f"up_blocks.{i}.resnets.{j}", resnet, (h, res[-1 - j]))
                if attentions is not None:
                    h = _transformer(add, f"up_blocks.{i}.attentions.{j}", attentions[j], h)
            if block.upsamplers is not None:
                h = add(_upsampler(f"up_blocks.{i}.upsamplers.0", block.upsamplers[0], h, skips[-1]))

        def head(ctx, x):
            return unet.conv_out(unet.conv_act(unet.conv_norm_out(x)))

        h = add(_frames("conv_norm_out", (h,), head, kind="conv"))
        return ops, h

    def rehash_cuts(self, unet) -> list[str]:
        """Candidate Step Rehash cuts: outputs of the up path's temporal layers (each res block's
        temporal half, each transformer's projection after its temporal blocks)."""
        cuts = []
        for i, block in enumerate(unet.up_blocks):
            attentions = getattr(block, "attentions", None)
            for j in range(len(block.resnets)):
                cuts.append(f"up_blocks.{i}.resnets.{j}.temporal_res_block.norm2")
                if attentions is not None:
                    cuts.append(f"up_blocks.{i}.attentions.{j}.proj_out")
        return cuts

    def example_inputs(self, unet, shape, device="cpu", seed: int = 0) -> tuple:
        """Positional forward arguments of ``shape`` (random on real devices, empty on meta)."""
        cfg = unet.config
        make = example_maker(unet, device, seed)

        b, t = shape.batch, shape.frames
        n_ids = cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim
        sample = make(b, t, cfg.in_channels, shape.latent_height, shape.latent_width)
        ehs = make(b, 1, cfg.cross_attention_dim)
        added = make(b, n_ids)
        return sample, torch.tensor(1.0, device=device), ehs, added

    # ------------------------------------------------------------------ one call
    def bind(
        self,
        unet,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        return_dict: bool = True,
    ) -> CallBinding:
        from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput
        from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

        # Same steps as UNetSpatioTemporalConditionModel.forward, "1. time" and the flattening.
        up_factor = 2**unet.num_upsamplers
        forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = maybe_adjust_dtype_for_device(
                torch.float64 if isinstance(timestep, float) else torch.int64, sample.device
            )
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif len(timesteps.shape) == 0:
            timesteps = timesteps[None].to(sample.device)
        batch, frames = sample.shape[:2]
        timesteps = timesteps.expand(batch)
        t_emb = unet.time_proj(timesteps).to(dtype=sample.dtype)
        emb = unet.time_embedding(t_emb)
        time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape((batch, -1)).to(emb.dtype)
        emb = emb + unet.add_embedding(time_embeds)
        emb = emb.repeat_interleave(frames, dim=0, output_size=emb.shape[0] * frames)
        ehs = encoder_hidden_states.repeat_interleave(
            frames, dim=0, output_size=encoder_hidden_states.shape[0] * frames
        )
        indicator = torch.zeros(batch, frames, dtype=sample.dtype, device=sample.device)

        def finish(out: torch.Tensor):
            out = out.reshape(batch, frames, *out.shape[1:])
            return UNetSpatioTemporalConditionOutput(sample=out) if return_dict else (out,)

        return CallBinding(
            env={"sample": sample.flatten(0, 1)},
            layouts={"sample": "nchw"},
            globals={
                "emb": emb,
                "ehs": ehs,
                "indicator": indicator,
                "batch": batch,
                "frames": frames,
                "forward_upsample_size": forward_upsample_size,
            },
            finish=finish,
            shape={
                "batch": batch,
                "frames": frames,
                "latent_height": sample.shape[-2],
                "latent_width": sample.shape[-1],
                "dtype": sample.dtype,
            },
        )


# ---------------------------------------------------------------------- transformer
def _transformer(add, prefix: str, model, h: str) -> str:
    """TransformerSpatioTemporalModel -> proj_in, per layer (spatial, temporal) blocks, proj_out."""

    def proj_in(ctx: SliceCtx, x):
        n, c, height, width = x.shape
        y = model.norm(x)
        return model.proj_in(y.permute(0, 2, 3, 1).reshape(n, height * width, y.shape[1]))

    t = add(_frames(f"{prefix}.proj_in", (h,), proj_in, layout="nlc", kind="proj"))
    for m, (block, temporal) in enumerate(zip(model.transformer_blocks, model.temporal_transformer_blocks, strict=True)):

        def spatial_fn(ctx: SliceCtx, x, block=block):
            return block(x, encoder_hidden_states=ctx.globals["ehs"][ctx.start : ctx.stop])

        t = add(_frames(f"{prefix}.transformer_blocks.{m}", (t,), spatial_fn, layout="nlc", kind="attention"))
        t = add(_temporal_block(f"{prefix}.temporal_transformer_blocks.{m}", prefix, model, temporal, t))

    def proj_out(ctx: SliceCtx, t_, x):
        n, _, height, width = x.shape
        y = model.proj_out(t_)
        y = y.reshape(n, height, width, y.shape[-1]).permute(0, 3, 1, 2).contiguous()
        return y + x

    return add(_frames(f"{prefix}.proj_out", (t, h), proj_out, kind="proj"))


def _temporal_block(name: str, prefix: str, model, block, t: str) -> Op:
    def fn(ctx: SliceCtx, x):
        g = ctx.globals
        b, frames = g["batch"], g["frames"]
        emb = _frame_embedding(model, prefix, g, x)
        ehs = g["ehs"]
        first = ehs[None, :].reshape(b, frames, -1, ehs.shape[-1])[:, 0]
        n = x.shape[1]
        context = first[:, None].broadcast_to(b, n, first.shape[-2], first.shape[-1])
        context = context.reshape(b * n, -1, first.shape[-1])
        mixed = block(x + emb, num_frames=frames, encoder_hidden_states=context)
        return model.time_mixer(x_spatial=x, x_temporal=mixed, image_only_indicator=g["indicator"])

    return Op(UnitSpec(name, "tokens", kind="temporal_attention"), (t,), name, fn, "nlc")


def _frame_embedding(model, prefix: str, g: dict, x: torch.Tensor) -> torch.Tensor:
    """The transformer's frame-position embedding ``[B*T, 1, C]``, computed once per call.

    Under autograd it is recomputed per slice instead: a cached tensor made inside one checkpointed
    slice would make that slice's recomputation differ from its forward."""
    key = f"{prefix}.frame_embedding"
    if key not in g:
        index = torch.arange(g["frames"], device=x.device).repeat(g["batch"], 1).reshape(-1)
        emb = model.time_pos_embed(model.time_proj(index).to(dtype=x.dtype))[:, None, :]
        if torch.is_grad_enabled():
            return emb
        g[key] = emb
    return g[key]


register(SVDUNetAdapter())
