"""Adapter for ``UNetMotionModel`` (AnimateDiff: a Stable Diffusion UNet plus a motion adapter).

Units, in execution order (module paths of the stock model):

- ``conv_in``, ``*.resnets.N`` (``ResnetBlock2D``; on the up path the skip ``torch.cat``, FreeU
  and ControlNet residuals happen inside the sliced unit, so the concatenated feature never
  exists at full size), ``*.attentions.N.proj_in`` (GroupNorm + proj_in),
  ``*.attentions.N.transformer_blocks.M`` (spatial self/cross attention),
  ``*.attentions.N.proj_out`` (+ residual), ``*.downsamplers.0``, ``*.upsamplers.0`` and
  ``conv_norm_out`` (+ act + conv_out) work frame by frame: sliced along frames (``B*T``).
- ``*.motion_modules.N`` (``AnimateDiffTransformer3D``: GroupNorm over channels-in-group, time
  and all pixels, then attention along time at each pixel) is sliced along spatial tokens, with
  the GroupNorm statistics gathered over all tokens first.

A ``Transformer2DModel`` that is not a continuous-input one (never the case in AnimateDiff
checkpoints) stays one frames unit named by its module path.
"""

from __future__ import annotations

import torch

from ...planner.errors import UnsupportedArgumentError
from ..program import Op, SliceCtx, UnitSpec
from .base import CallBinding, example_maker, register
from .spatiotemporal import _group_norm, _time_stats, frames_op, upsampler


class AnimateDiffUNetAdapter:
    name = "animatediff-unet"
    model_classes = ("UNetMotionModel",)
    method = "forward"
    component = "unet"
    # Streaming units finer than a top-level block (runtime.streaming.stream_block_of): each res block,
    # spatial transformer, motion module and resampler streams on its own, so the floor is not a whole
    # up block plus the next one (up_blocks.0 + up_blocks.1: 1.19 GiB at fp16).
    stream_parts = ("resnets", "attentions", "motion_modules", "upsamplers", "downsamplers")

    # ------------------------------------------------------------------ program structure
    def ops(self, unet) -> tuple[list[Op], str]:
        ops: list[Op] = []

        def add(op: Op) -> str:
            ops.append(op)
            return op.output

        h = add(frames_op("conv_in", ("sample",), lambda ctx, x: unet.conv_in(x), kind="conv"))
        skips: list[tuple[str, int]] = [(h, 0)]  # (value, index in diffusers' down_block_res_samples)
        for i, block in enumerate(unet.down_blocks):
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                h = add(_resnet(f"down_blocks.{i}.resnets.{j}", resnet, (h,)))
                if attentions is not None:
                    h = _transformer(add, f"down_blocks.{i}.attentions.{j}", attentions[j], h)
                h = add(_motion(f"down_blocks.{i}.motion_modules.{j}", block.motion_modules[j], h))
                skips.append((h, len(skips)))
            if block.downsamplers is not None:
                ds = block.downsamplers[0]
                h = add(
                    frames_op(f"down_blocks.{i}.downsamplers.0", (h,), lambda ctx, x, m=ds: m(x), kind="down")
                )
                skips.append((h, len(skips)))

        mid = unet.mid_block
        if mid is not None:
            h = add(_resnet("mid_block.resnets.0", mid.resnets[0], (h,)))
            motion = getattr(mid, "motion_modules", None)
            for j, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:], strict=False)):
                h = _transformer(add, f"mid_block.attentions.{j}", attn, h)
                if motion is not None:
                    h = add(_motion(f"mid_block.motion_modules.{j}", motion[j], h))
                h = add(_resnet(f"mid_block.resnets.{j + 1}", resnet, (h,)))

        for i, block in enumerate(unet.up_blocks):
            res = skips[-len(block.resnets) :]
            skips = skips[: -len(block.resnets)]
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                skip, index = res[-1 - j]
                up = _UpInput(block, index, after_mid=(i == 0 and j == 0))
                h = add(_resnet(f"up_blocks.{i}.resnets.{j}", resnet, (h, skip), up))
                if attentions is not None:
                    h = _transformer(add, f"up_blocks.{i}.attentions.{j}", attentions[j], h)
                h = add(_motion(f"up_blocks.{i}.motion_modules.{j}", block.motion_modules[j], h))
            if block.upsamplers is not None:
                # diffusers forwards the next skip's size only below the last block, which has none.
                h = add(upsampler(f"up_blocks.{i}.upsamplers.0", block.upsamplers[0], h, skips[-1][0]))

        def head(ctx, x):
            if unet.conv_norm_out is not None:
                x = unet.conv_act(unet.conv_norm_out(x))
            return unet.conv_out(x)

        h = add(frames_op("conv_norm_out", (h,), head, kind="conv"))
        return ops, h

    def rehash_cuts(self, unet) -> list[str]:
        """Candidate Step Rehash cuts: the outputs of the up path's motion modules."""
        return [
            f"up_blocks.{i}.motion_modules.{j}"
            for i, block in enumerate(unet.up_blocks)
            for j in range(len(block.motion_modules))
        ]

    def example_inputs(self, unet, shape, device="cpu", seed: int = 0) -> tuple:
        """Positional forward arguments of ``shape``: ``sample [B, C, T, H, W]``, a timestep and the
        prompt embeddings repeated per frame (``[B*T, 77, D]``, as the AnimateDiff pipelines pass
        them). Random on real devices, empty on meta."""
        cfg = unet.config
        make = example_maker(unet, device, seed)

        b, t = shape.batch, shape.frames
        cross = cfg.cross_attention_dim
        cross = cross if isinstance(cross, int) else cross[0]
        sample = make(b, cfg.in_channels, t, shape.latent_height, shape.latent_width)
        ehs = make(b * t, 77, cross)
        return sample, torch.tensor(999, device=device), ehs

    # ------------------------------------------------------------------ one call
    def bind(
        self,
        unet,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        added_cond_kwargs: dict | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> CallBinding:
        from diffusers.models.unets.unet_motion_model import UNetMotionOutput
        from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

        if attention_mask is not None:
            raise UnsupportedArgumentError(
                "vramplan's planned UNetMotionModel forward does not support attention_mask; "
                "remove the plan (handle.remove()) to run with a mask."
            )
        cross_attention_kwargs = dict(cross_attention_kwargs) if cross_attention_kwargs is not None else None
        if cross_attention_kwargs is not None:
            # What the forward's @apply_lora_scale would do: it pops "scale" and scales LoRA layers.
            lora_scale = cross_attention_kwargs.pop("scale", None)
            if lora_scale is not None and lora_scale != 1.0 and _has_lora_layers(unet):
                raise UnsupportedArgumentError(
                    "vramplan's planned UNetMotionModel forward does not apply a LoRA scale passed as "
                    "cross_attention_kwargs['scale']; fuse the LoRA with that scale (pipe.fuse_lora(lora_scale=...)) "
                    "or set it with pipe.set_adapters(..., adapter_weights=...)."
                )
            if "ip_adapter_masks" in cross_attention_kwargs:
                raise UnsupportedArgumentError(
                    "vramplan's planned UNetMotionModel forward does not support IP-Adapter masks "
                    "(cross_attention_kwargs['ip_adapter_masks'])."
                )

        if down_block_additional_residuals is not None:
            skips = 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in unet.down_blocks)
            if len(down_block_additional_residuals) != skips:
                raise ValueError(
                    f"down_block_additional_residuals must have one tensor per skip connection ({skips}), "
                    f"got {len(down_block_additional_residuals)}."
                )

        # Same steps as UNetMotionModel.forward: upsample size, "1. time", "2. pre-process".
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
        batch, frames = sample.shape[0], sample.shape[2]
        timesteps = timesteps.expand(batch)
        t_emb = unet.time_proj(timesteps).to(dtype=unet.dtype)
        emb = unet.time_embedding(t_emb, timestep_cond)
        if unet.config.addition_embed_type == "text_time":
            if (
                not added_cond_kwargs
                or "text_embeds" not in added_cond_kwargs
                or "time_ids" not in added_cond_kwargs
            ):
                raise ValueError(
                    f"{unet.__class__} has the config param `addition_embed_type` set to 'text_time' which requires "
                    "`text_embeds` and `time_ids` in `added_cond_kwargs`"
                )
            text_embeds = added_cond_kwargs["text_embeds"]
            time_embeds = unet.add_time_proj(added_cond_kwargs["time_ids"].flatten())
            time_embeds = time_embeds.reshape((text_embeds.shape[0], -1))
            add_embeds = torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + unet.add_embedding(add_embeds)
        emb = emb.repeat_interleave(frames, dim=0, output_size=emb.shape[0] * frames)

        ehs = encoder_hidden_states
        rows = batch * frames
        if not torch.is_tensor(ehs) or ehs.shape[0] != rows:
            got = tuple(ehs.shape) if torch.is_tensor(ehs) else type(ehs).__name__
            raise ValueError(
                f"encoder_hidden_states must have batch*frames = {rows} rows (the AnimateDiff pipelines repeat the "
                f"prompt embeddings per frame with repeat_interleave); got {got}."
            )
        if (
            getattr(unet, "encoder_hid_proj", None) is not None
            and unet.config.encoder_hid_dim_type == "ip_image_proj"
        ):
            if not added_cond_kwargs or "image_embeds" not in added_cond_kwargs:
                raise ValueError(
                    f"{unet.__class__} has the config param `encoder_hid_dim_type` set to 'ip_image_proj' which "
                    "requires the keyword argument `image_embeds` to be passed in `added_cond_kwargs`"
                )
            image_embeds = unet.encoder_hid_proj(added_cond_kwargs["image_embeds"])
            image_embeds = [
                e.repeat_interleave(frames, dim=0, output_size=e.shape[0] * frames) for e in image_embeds
            ]
            ehs = (ehs, image_embeds)

        flat = sample.permute(0, 2, 1, 3, 4).reshape((batch * frames, -1) + sample.shape[3:])

        def finish(out: torch.Tensor):
            out = out[None, :].reshape((-1, frames) + out.shape[1:]).permute(0, 2, 1, 3, 4)
            return UNetMotionOutput(sample=out) if return_dict else (out,)

        return CallBinding(
            env={"sample": flat},
            layouts={"sample": "nchw"},
            globals={
                "emb": emb,
                "ehs": ehs,
                "cross_attention_kwargs": cross_attention_kwargs,
                "down_residuals": tuple(down_block_additional_residuals or ()),
                "mid_residual": mid_block_additional_residual,
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


def _has_lora_layers(model: torch.nn.Module) -> bool:
    """Whether PEFT LoRA layers are attached (without them diffusers ignores a LoRA scale too)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


# ---------------------------------------------------------------------- per-frame helpers
def _rows(t: torch.Tensor, ctx: SliceCtx) -> torch.Tensor:
    """The frames ``[start, stop)`` of a per-frame tensor; a tensor without ``B*T`` rows broadcasts."""
    if t.dim() > 0 and t.shape[0] == ctx.globals["batch"] * ctx.globals["frames"]:
        return t[ctx.start : ctx.stop]
    return t


def _ehs(ctx: SliceCtx):
    ehs = ctx.globals["ehs"]
    if isinstance(ehs, tuple):  # IP-Adapter: (prompt embeddings, [image embeddings per adapter])
        return ehs[0][ctx.start : ctx.stop], [e[ctx.start : ctx.stop] for e in ehs[1]]
    return ehs[ctx.start : ctx.stop]


class _UpInput:
    """How an up-path resnet prepares its inputs, as ``UNetMotionModel.forward`` and the up blocks do:
    ``mid_block_additional_residual`` (first up resnet), ``down_block_additional_residuals`` (on the
    skip), FreeU, then the channel concatenation."""

    def __init__(self, block, skip_index: int, after_mid: bool) -> None:
        self.block, self.skip_index, self.after_mid = block, skip_index, after_mid

    def __call__(self, ctx: SliceCtx, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        from diffusers.utils.torch_utils import apply_freeu

        g = ctx.globals
        if self.after_mid and g["mid_residual"] is not None:
            x = x + _rows(g["mid_residual"], ctx)
        if self.skip_index < len(g["down_residuals"]):
            skip = skip + _rows(g["down_residuals"][self.skip_index], ctx)
        b = self.block
        if (
            getattr(b, "s1", None)
            and getattr(b, "s2", None)
            and getattr(b, "b1", None)
            and getattr(b, "b2", None)
        ):
            # FreeU scales half the channels of x in place: on a copy of the slice here.
            x, skip = apply_freeu(b.resolution_idx, x.clone(), skip, s1=b.s1, s2=b.s2, b1=b.b1, b2=b.b2)
        return torch.cat([x, skip], dim=1)


def _resnet(name: str, resnet, inputs: tuple[str, ...], up: _UpInput | None = None) -> Op:
    def fn(ctx: SliceCtx, x, skip=None):
        if up is not None:
            x = up(ctx, x, skip)
        return resnet(x, ctx.globals["emb"][ctx.start : ctx.stop])

    return frames_op(name, inputs, fn, kind="resnet")


# ---------------------------------------------------------------------- spatial transformer
def _transformer(add, prefix: str, model, h: str) -> str:
    """Transformer2DModel -> proj_in (GroupNorm + proj_in), one unit per block, proj_out (+ residual)."""
    if not getattr(model, "is_input_continuous", False):

        def whole(ctx: SliceCtx, x):
            kwargs = ctx.globals["cross_attention_kwargs"]
            return model(
                x, encoder_hidden_states=_ehs(ctx), cross_attention_kwargs=kwargs, return_dict=False
            )[0]

        return add(frames_op(prefix, (h,), whole, kind="attention"))

    def proj_in(ctx: SliceCtx, x):
        n, _, height, width = x.shape
        y = model.norm(x)
        if not model.use_linear_projection:
            y = model.proj_in(y)
            return y.permute(0, 2, 3, 1).reshape(n, height * width, y.shape[1])
        return model.proj_in(y.permute(0, 2, 3, 1).reshape(n, height * width, y.shape[1]))

    t = add(frames_op(f"{prefix}.proj_in", (h,), proj_in, layout="nlc", kind="proj"))
    for m, block in enumerate(model.transformer_blocks):

        def block_fn(ctx: SliceCtx, x, block=block):
            return block(
                x,
                attention_mask=None,
                encoder_hidden_states=_ehs(ctx),
                encoder_attention_mask=None,
                timestep=None,
                cross_attention_kwargs=ctx.globals["cross_attention_kwargs"],
                class_labels=None,
            )

        t = add(frames_op(f"{prefix}.transformer_blocks.{m}", (t,), block_fn, layout="nlc", kind="attention"))

    def proj_out(ctx: SliceCtx, t_, x):
        n, _, height, width = x.shape
        if not model.use_linear_projection:
            y = t_.reshape(n, height, width, t_.shape[-1]).permute(0, 3, 1, 2).contiguous()
            y = model.proj_out(y)
        else:
            y = model.proj_out(t_)
            y = y.reshape(n, height, width, y.shape[-1]).permute(0, 3, 1, 2).contiguous()
        return y + x

    return add(frames_op(f"{prefix}.proj_out", (t, h), proj_out, kind="proj"))


# ---------------------------------------------------------------------- motion module
def _motion(name: str, module, h: str) -> Op:
    """AnimateDiffTransformer3D on a token slice ``[B*T, C, n]``.

    Its GroupNorm runs on ``[B, C, T, H, W]``: per (sample, group) over channels-in-group, time and
    all pixels, so the statistics come from a first pass over every token slice. Everything after it
    (proj_in, temporal attention blocks, proj_out) treats each pixel's ``[T, C]`` sequence on its own.
    """

    def fn(ctx: SliceCtx, x):
        b, t = ctx.globals["batch"], ctx.globals["frames"]
        _, c, n = x.shape
        y = _group_norm(module.norm, x.reshape(b, t, c, n).permute(0, 2, 1, 3), ctx.prepared)  # [B, C, T, n]
        y = y.permute(0, 3, 2, 1).reshape(b * n, t, c)
        y = module.proj_in(input=y)
        for block in module.transformer_blocks:
            y = block(
                hidden_states=y,
                encoder_hidden_states=None,
                timestep=None,
                cross_attention_kwargs=None,
                class_labels=None,
            )
        y = module.proj_out(input=y)
        y = y.reshape(b, n, t, c).permute(0, 2, 3, 1).reshape(b * t, c, n)
        return y + x

    return Op(UnitSpec(name, "tokens", True, kind="motion"), (h,), name, fn, "nchw", _time_stats(module.norm))


register(AnimateDiffUNetAdapter())
