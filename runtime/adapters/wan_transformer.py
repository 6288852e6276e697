"""Adapter for ``WanTransformer3DModel`` (Wan 2.1 / 2.2 diffusion transformers: T2V, I2V, TI2V).

Hidden states are ``[B, L, C]`` tokens (``nlc``); every unit but the patch embedding, the
cross-attention keys/values and the unpatchify slices along tokens. Units, in execution order:

- ``patch_embedding`` (no axis): the Conv3d patchifier, flattened to tokens.
- per block ``blocks.N``:
  ``attn1.kv`` (tokens): FP32LayerNorm + AdaLN modulation, ``to_k``/``to_v``, the q/k RMSNorm
  on keys, rotary embedding of the keys (the fp32 cos/sin sliced with the tokens) — packed
  ``[B, L, 2*inner]``; ``attn2.kv`` (no axis): the text keys/values (and the image ones for I2V),
  computed once per call; ``attn1`` (tokens, reads ``attn1.kv`` **whole**): the queries of the
  chunk against all keys and values, output projection, gated fp32 residual; ``attn2`` (tokens,
  reads ``attn2.kv`` whole): cross-attention + residual; ``ffn`` (tokens): modulated norm,
  feed-forward, gated fp32 residual.
- ``norm_out`` (tokens): output norm + modulation + ``proj_out``; ``unpatchify`` (no axis).

Self-attention by query chunks with full keys and values is exact: each query's softmax runs over
every key either way. The per-call prologue (rotary table, time / text / image embeddings) is the
stock forward's own code. Per-token timesteps (Wan 2.2 TI2V: ``timestep`` ``[B, L]``) give a
per-token modulation that the units slice with their tokens.
"""

from __future__ import annotations

import torch

from ...planner.errors import UnsupportedArgumentError
from ..program import Op, SliceCtx, UnitSpec
from .base import CallBinding, example_maker, register

TEXT_TOKENS = 512  # the stock WanAttnProcessor's hard-coded text context length (I2V splits at it)
IMAGE_TOKENS = 257  # CLIP ViT-H/14 image embeddings of Wan 2.1 I2V


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``WanAttnProcessor``'s rotary embedding, verbatim (fp32 cos/sin, result in ``x``'s dtype)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _tokens(t: torch.Tensor, ctx: SliceCtx) -> torch.Tensor:
    return t[:, ctx.start : ctx.stop] if ctx.axis == "tokens" else t


def _modulation(block, ctx: SliceCtx) -> tuple[torch.Tensor, ...]:
    """The block's six AdaLN terms for the slice: per batch ``[B, 1, C]`` or per token ``[B, n, C]``."""
    temb = ctx.globals["timestep_proj"]
    if temb.ndim == 4:  # [B, L, 6, C]: Wan 2.2 TI2V, one timestep per token
        terms = (block.scale_shift_table.unsqueeze(0) + _tokens(temb, ctx).float()).chunk(6, dim=2)
        return tuple(t.squeeze(2) for t in terms)
    return (block.scale_shift_table + temb.float()).chunk(6, dim=1)


def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                backend=attn.processor._attention_backend, parallel_config=None)
    return out.flatten(2, 3).type_as(q)


class WanTransformerAdapter:
    name = "wan-transformer"
    model_classes = ("WanTransformer3DModel",)
    method = "forward"
    component = "transformer"
    sample_layout = "bcthw"  # hidden_states are [B, C, T, H, W] (sample_shape reads it so)

    # ------------------------------------------------------------------ program structure
    def ops(self, model) -> tuple[list[Op], str]:
        ops: list[Op] = []

        def add(name: str, axis, inputs: tuple[str, ...], fn, kind: str, whole: tuple[str, ...] = ()) -> str:
            ops.append(Op(UnitSpec(name, axis, kind=kind, whole_inputs=whole), inputs, name, fn, "nlc"))
            return name

        def patch(ctx: SliceCtx, x):
            return model.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()

        h = add("patch_embedding", None, ("hidden_states",), patch, "conv")
        for i, block in enumerate(model.blocks):
            p = f"blocks.{i}"
            kv1 = add(f"{p}.attn1.kv", "tokens", (h,), _self_kv(block), "proj")
            kv2 = add(f"{p}.attn2.kv", None, ("context",), _cross_kv(block), "proj")
            h = add(f"{p}.attn1", "tokens", (h, kv1), _self_attention(block), "attention", whole=(kv1,))
            h = add(f"{p}.attn2", "tokens", (h, kv2), _cross_attention(block), "attention", whole=(kv2,))
            h = add(f"{p}.ffn", "tokens", (h,), _ffn(block), "ffn")

        def head(ctx: SliceCtx, x):
            temb = ctx.globals["temb"]
            if temb.ndim == 3:  # [B, L, C]: per-token (TI2V)
                shift, scale = (model.scale_shift_table.unsqueeze(0).to(temb.device)
                                + _tokens(temb, ctx).unsqueeze(2)).chunk(2, dim=2)
                shift, scale = shift.squeeze(2), scale.squeeze(2)
            else:
                shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
            y = (model.norm_out(x.float()) * (1 + scale.to(x.device)) + shift.to(x.device)).type_as(x)
            return model.proj_out(y)

        h = add("norm_out", "tokens", (h,), head, "proj")

        def unpatchify(ctx: SliceCtx, x):
            b, f, hh, ww = ctx.globals["grid"]
            p_t, p_h, p_w = model.config.patch_size
            x = x.reshape(b, f, hh, ww, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
            return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

        return ops, add("unpatchify", None, (h,), unpatchify, "reshape")

    def rehash_cuts(self, model) -> list[str]:
        """Residual cuts (the planner's rule): the first F and last B blocks run every step, the middle
        blocks' residual is cached (DBCache's F/B)."""
        from ...planner.rehash import residual_candidates

        ops, _ = self.ops(model)
        return residual_candidates([(op.output, op.inputs) for op in ops], {op.output: op.spec.kind for op in ops})

    def stock_values(self, model) -> dict[str, tuple[str, str]]:
        """Values of the program the stock forward shows at a module: the patch embedding's tokens are the
        first block's input, each block's ``ffn`` its output (Step Rehash's key steps read a residual span's
        ends off the stock forward)."""
        out = {f"blocks.{i}.ffn": (f"blocks.{i}", "output") for i in range(len(model.blocks))}
        return {"patch_embedding": ("blocks.0", "input"), **out} if len(model.blocks) else out

    def example_inputs(self, model, shape, device="cpu", seed: int = 0) -> tuple:
        """``hidden_states [B, C, T, H, W]``, a timestep, 512 text embeddings (plus 257 CLIP image
        embeddings for an image-conditioned model). A 48-channel model (Wan 2.2 TI2V-5B, the one on the
        Wan 2.2 VAE) gets per-token timesteps ``[B, L]``, as its pipeline passes them."""
        cfg = model.config
        make = example_maker(model, device, seed)
        b = shape.batch
        x = make(b, cfg.in_channels, shape.frames, shape.latent_height, shape.latent_width)
        ehs = make(b, TEXT_TOKENS, cfg.text_dim)
        if cfg.in_channels == 48:
            p_t, p_h, p_w = cfg.patch_size
            n = (shape.frames // p_t) * (shape.latent_height // p_h) * (shape.latent_width // p_w)
            t = torch.full((b, n), 999.0, device=device)
        else:
            t = torch.full((b,), 999.0, device=device)
        image = make(b, IMAGE_TOKENS, cfg.image_dim) if cfg.image_dim is not None else None
        return x, t, ehs, image

    # ------------------------------------------------------------------ one call
    def bind(self, model, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
             return_dict: bool = True, attention_kwargs: dict | None = None) -> CallBinding:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if attention_kwargs and attention_kwargs.get("scale", 1.0) != 1.0:
            raise UnsupportedArgumentError(
                "vramplan's planned WanTransformer3DModel forward does not apply a LoRA scale passed in "
                "attention_kwargs['scale']; fuse the LoRA with that scale (pipe.fuse_lora(lora_scale=...))."
            )
        if any(getattr(m, "fused_projections", False) for b in model.blocks for m in (b.attn1, b.attn2)):
            raise UnsupportedArgumentError(
                "vramplan's planned WanTransformer3DModel forward runs the unfused q/k/v projections; call "
                "unfuse_qkv_projections() on the transformer first."
            )
        b, _, f, hh, ww = hidden_states.shape
        p_t, p_h, p_w = model.config.patch_size
        grid = (b, f // p_t, hh // p_h, ww // p_w)
        # The stock forward's prologue, step by step.
        cos, sin = model.rope(hidden_states)
        ts_seq_len = None
        if timestep.ndim == 2:
            ts_seq_len = timestep.shape[1]
            timestep = timestep.flatten()
        temb, timestep_proj, ehs, ehs_image = model.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=ts_seq_len
        )
        if ts_seq_len is not None:
            timestep_proj = timestep_proj.unflatten(2, (6, -1))
        else:
            timestep_proj = timestep_proj.unflatten(1, (6, -1))
        if ehs_image is not None:
            ehs = torch.concat([ehs_image, ehs], dim=1)

        def finish(out: torch.Tensor):
            return Transformer2DModelOutput(sample=out) if return_dict else (out,)

        return CallBinding(
            env={"hidden_states": hidden_states, "context": ehs},
            layouts={"hidden_states": "nchw", "context": "nlc"},
            globals={"rope": (cos, sin), "temb": temb, "timestep_proj": timestep_proj, "grid": grid},
            finish=finish,
            shape={"batch": b, "frames": f, "latent_height": hh, "latent_width": ww, "dtype": hidden_states.dtype},
        )


# ---------------------------------------------------------------------- block units
def _normed(norm, x: torch.Tensor, shift, scale) -> torch.Tensor:
    return (norm(x.float()) * (1 + scale) + shift).type_as(x)


def _heads(attn, t: torch.Tensor) -> torch.Tensor:
    return t.unflatten(2, (attn.heads, -1))


def _rotary(ctx: SliceCtx, t: torch.Tensor) -> torch.Tensor:
    cos, sin = ctx.globals["rope"]
    return _rope(t, _tokens(cos, ctx), _tokens(sin, ctx))


def _self_kv(block):
    attn = block.attn1

    def fn(ctx: SliceCtx, x):
        shift, scale, *_ = _modulation(block, ctx)
        y = _normed(block.norm1, x, shift, scale)
        k = _rotary(ctx, _heads(attn, attn.norm_k(attn.to_k(y))))
        v = attn.to_v(y)
        return torch.cat([k.flatten(2, 3), v], dim=-1)

    return fn


def _cross_kv(block):
    attn = block.attn2

    def fn(ctx: SliceCtx, context):
        parts = []
        if attn.add_k_proj is not None:
            n_img = context.shape[1] - TEXT_TOKENS
            image, context = context[:, :n_img], context[:, n_img:]
            parts.append(torch.cat([attn.norm_added_k(attn.add_k_proj(image)), attn.add_v_proj(image)], dim=-1))
        parts.append(torch.cat([attn.norm_k(attn.to_k(context)), attn.to_v(context)], dim=-1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    return fn


def _split_kv(attn, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = kv.chunk(2, dim=-1)
    return _heads(attn, k), _heads(attn, v)


def _self_attention(block):
    attn = block.attn1

    def fn(ctx: SliceCtx, x, kv):
        shift, scale, gate, *_ = _modulation(block, ctx)
        y = _normed(block.norm1, x, shift, scale)
        q = _rotary(ctx, _heads(attn, attn.norm_q(attn.to_q(y))))
        k, v = _split_kv(attn, kv)
        out = attn.to_out[1](attn.to_out[0](_attend(attn, q, k, v)))
        return (x.float() + out * gate).type_as(x)

    return fn


def _cross_attention(block):
    attn = block.attn2

    def fn(ctx: SliceCtx, x, kv):
        y = block.norm2(x.float()).type_as(x)
        q = _heads(attn, attn.norm_q(attn.to_q(y)))
        image = None
        if attn.add_k_proj is not None:
            n_img = kv.shape[1] - TEXT_TOKENS
            image = _attend(attn, q, *_split_kv(attn, kv[:, :n_img]))
            kv = kv[:, n_img:]
        out = _attend(attn, q, *_split_kv(attn, kv))
        if image is not None:
            out = out + image
        return x + attn.to_out[1](attn.to_out[0](out))

    return fn


def _ffn(block):
    def fn(ctx: SliceCtx, x):
        *_, c_shift, c_scale, c_gate = _modulation(block, ctx)
        y = _normed(block.norm3, x, c_shift, c_scale)
        return (x.float() + block.ffn(y).float() * c_gate).type_as(x)

    return fn


register(WanTransformerAdapter())
