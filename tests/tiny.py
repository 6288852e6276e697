"""Tiny configs of the real diffusers classes, built in code with random weights (fp32)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from vramplan.runtime.tiny import TINY_UNET as SVD_TINY
from vramplan.runtime.tiny import randomize_norms


def tiny_svd_unet(seed: int = 0, **overrides):
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    return randomize_norms(UNetSpatioTemporalConditionModel(**{**SVD_TINY, **overrides}), seed).eval()


def svd_inputs(unet, batch=1, frames=5, height=8, width=8, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(batch, frames, cfg.in_channels, height, width, generator=g)
    ehs = torch.randn(batch, 1, cfg.cross_attention_dim, generator=g)
    n_ids = cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim
    added = torch.rand(batch, n_ids, generator=g) * 10
    timestep = torch.tensor(3.7)
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in (sample, timestep, ehs, added)]


# ---------------------------------------------------------------------- one tiny case per adapter
# The conformance suite (test_conformance.py) runs every registered adapter through the same checks.
# A new adapter registers its model class here with a factory: the suite fails until it does.


@dataclass
class Case:
    """A tiny model of one adapter's class and how to call its planned method.

    ``inputs(batch, frames, h, w, seed)`` -> (positional args, keyword args, plan SampleShape);
    ``output(model, args, kwargs)`` -> the tensor the planned method returns; ``container``: a
    module the executor bypasses (for the hook checks).
    """

    model: torch.nn.Module
    inputs: Callable[..., tuple[tuple, dict, object]]
    output: Callable[[torch.nn.Module, tuple, dict], torch.Tensor]
    container: str


def _shape(batch, frames, h, w, dtype=torch.float32):
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime.apply import dtype_name

    return SampleShape(batch=batch, frames=frames, latent_height=h, latent_width=w, dtype=dtype_name(dtype))


def _svd_unet_case() -> Case:
    def inputs(batch, frames, h, w, seed=1):
        sample, t, ehs, ids = svd_inputs(UNET, batch=batch, frames=frames, height=h, width=w, seed=seed)
        return (sample, t, ehs, ids), {}, _shape(batch, frames, h, w)

    UNET = tiny_svd_unet()
    return Case(UNET, inputs, lambda m, a, kw: m(*a, **kw).sample, "down_blocks.0")


def _svd_vae_case() -> Case:
    from diffusers import AutoencoderKLTemporalDecoder
    from vramplan.runtime.tiny import TINY_VAE

    torch.manual_seed(0)
    vae = randomize_norms(AutoencoderKLTemporalDecoder(**TINY_VAE), 3).eval()

    def inputs(batch, frames, h, w, seed=1):
        z = torch.randn(batch * frames, 4, h, w, generator=torch.Generator().manual_seed(seed))
        return (z,), {"num_frames": frames}, _shape(batch, frames, h, w)

    return Case(vae, inputs, lambda m, a, kw: m.decode(*a, **kw).sample, "decoder.mid_block")


def _motion_unet_case() -> Case:
    from diffusers import UNetMotionModel
    from vramplan.runtime.tiny import TINY_MOTION_UNET

    torch.manual_seed(0)
    unet = randomize_norms(UNetMotionModel(**TINY_MOTION_UNET), 0).eval()

    def inputs(batch, frames, h, w, seed=1):
        g = torch.Generator().manual_seed(seed)
        sample = torch.randn(batch, unet.config.in_channels, frames, h, w, generator=g)
        ehs = torch.randn(batch * frames, 7, unet.config.cross_attention_dim, generator=g)
        return (sample, torch.tensor(3), ehs), {}, _shape(batch, frames, h, w)

    return Case(unet, inputs, lambda m, a, kw: m(*a, **kw).sample, "down_blocks.0")


def _sd_vae_case() -> Case:
    from diffusers import AutoencoderKL
    from vramplan.runtime.tiny import TINY_SD_VAE

    torch.manual_seed(0)
    vae = randomize_norms(AutoencoderKL(**TINY_SD_VAE), 1).eval()

    def inputs(batch, frames, h, w, seed=1):
        z = torch.randn(batch * frames, 4, h, w, generator=torch.Generator().manual_seed(seed))
        return (z,), {}, _shape(1, batch * frames, h, w)  # decode sees a flat batch of images

    return Case(vae, inputs, lambda m, a, kw: m.decode(*a, **kw).sample, "decoder.mid_block")


TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)


def tiny_wan(seed: int = 0, **overrides):
    """A tiny WanTransformer3DModel (diffusers' own test config); ``image_dim=8, added_kv_proj_dim=24``
    makes it image-conditioned (Wan 2.1 I2V)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY_WAN, **overrides}).eval()


def wan_inputs(model, batch, frames, h, w, seed=1, text=7, per_token=False):
    """``hidden_states [B, C, T, 2h, 2w]`` (h*w*T tokens), timesteps, text (and image) embeddings."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, frames, 2 * h, 2 * w, generator=g)
    t = torch.rand(batch, frames * h * w, generator=g) * 900 if per_token else torch.rand(batch, generator=g) * 900
    image = None
    if cfg.image_dim is not None:
        text = 512  # the stock processor splits image and text context at 512 text tokens
        image = torch.randn(batch, 257, cfg.image_dim, generator=g)
    ehs = torch.randn(batch, text, cfg.text_dim, generator=g)
    return (x, t, ehs, image), {}, _shape(batch, frames, 2 * h, 2 * w)


def _wan_case() -> Case:
    model = tiny_wan()
    return Case(model, lambda b, f, h, w, seed=1: wan_inputs(model, b, f, h, w, seed),
                lambda m, a, kw: m(*a, **kw).sample, "blocks.0")


def tiny_umt5(seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8)
    return UMT5EncoderModel(config).eval()


def _umt5_case() -> Case:
    model = tiny_umt5()

    def inputs(batch, frames, h, w, seed=1):
        g = torch.Generator().manual_seed(seed)
        n = frames * w  # tokens: the conformance suite's "other shape" changes frames
        ids = torch.randint(0, 100, (batch, n), generator=g)
        mask = torch.ones(batch, n, dtype=torch.long)
        mask[:, n - n // 3 :] = 0  # padding, as the Wan pipelines pad prompts to 512 tokens
        return (ids, mask), {}, _shape(batch, 1, 1, n)

    return Case(model, inputs, lambda m, a, kw: m(*a, **kw).last_hidden_state, "encoder.block.0")


TINY_WAN_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                    latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
# Wan 2.2's decoder: residual up blocks (DupUp3D shortcuts), a 2x2 patch (unpatchify), z48 -> here z8.
TINY_WAN22_VAE = dict(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                      temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                      out_channels=12, latents_mean=[0.0] * 8, latents_std=[1.0] * 8)


def tiny_wan_vae(seed: int = 0, wan22: bool = False):
    """A tiny AutoencoderKLWan with random weights (its default init leaves the RMS norms at 1)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**(TINY_WAN22_VAE if wan22 else TINY_WAN_VAE)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return vae


def _wan_vae_case() -> Case:
    vae = tiny_wan_vae()

    def inputs(batch, frames, h, w, seed=1):
        z = torch.randn(batch, vae.config.z_dim, frames, h, w, generator=torch.Generator().manual_seed(seed))
        return (z,), {}, _shape(batch, frames, h, w)

    # post_quant_conv: the one module the stock decode calls once (the decoder runs once per latent frame)
    return Case(vae, inputs, lambda m, a, kw: m.decode(*a, **kw).sample, "post_quant_conv")


TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                        image_size=28, patch_size=7, projection_dim=12)


def _clip_vision_case(projection: bool) -> Callable[[], Case]:
    def make() -> Case:
        from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

        torch.manual_seed(0)
        cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
        model = cls(CLIPVisionConfig(**TINY_CLIP_VISION)).eval()

        def inputs(batch, frames, h, w, seed=1):  # h x (w + frames) patches of 7 pixels (positions interpolated)
            x = torch.randn(batch, 3, 7 * h, 7 * (w + frames), generator=torch.Generator().manual_seed(seed))
            return (x,), {"interpolate_pos_encoding": True}, _shape(batch, 1, 7 * h, 7 * (w + frames))

        prefix = "vision_model." if projection else ""
        return Case(model, inputs, lambda m, a, kw: m(*a, **kw).last_hidden_state, f"{prefix}encoder")

    return make


CASES: dict[str, Callable[[], Case]] = {
    "UNetSpatioTemporalConditionModel": _svd_unet_case,
    "AutoencoderKLTemporalDecoder": _svd_vae_case,
    "UNetMotionModel": _motion_unet_case,
    "AutoencoderKL": _sd_vae_case,
    "WanTransformer3DModel": _wan_case,
    "AutoencoderKLWan": _wan_vae_case,
    "UMT5EncoderModel": _umt5_case,
    "CLIPVisionModel": _clip_vision_case(False),
    "CLIPVisionModelWithProjection": _clip_vision_case(True),
}


# ---------------------------------------------------------------------- checks shared by test modules
def gradients(case: Case, args, kwargs, run) -> list[torch.Tensor]:
    """Gradients of a fixed random projection of ``run(args)`` w.r.t. the float inputs and every weight."""
    model = case.model
    args = [a.clone().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() and a.dim() else a for a in args]
    model.zero_grad(set_to_none=True)
    out = run(args)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * weights).sum().backward()
    grads = [a.grad for a in args if torch.is_tensor(a) and a.requires_grad]
    grads += [p.grad for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


def assert_gradients_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """fp32 1e-5, relative to the largest gradient (sums over many elements round differently)."""
    assert len(got) == len(expected) > 0
    scale = max(g.abs().max().item() for g in expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * scale)


def tiny_wan_i2v(clip: str | None = None):
    """A tiny ``WanImageToVideoPipeline``: latents (16) + mask (4) + condition latents (16) into the DiT.
    ``clip`` None: no image encoder (as Wan 2.2 I2V); "plain" / "projection": a tiny ``CLIPVisionModel``
    / ``...WithProjection`` whose penultimate hidden state enters the DiT's added K/V (as Wan 2.1 I2V)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    if clip is None:
        return WanImageToVideoPipeline(tokenizer=None, text_encoder=tiny_umt5(), vae=vae, scheduler=scheduler,
                                       transformer=tiny_wan(seed=1, in_channels=36, out_channels=16))
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(2)
    cls = CLIPVisionModelWithProjection if clip == "projection" else CLIPVisionModel
    encoder = cls(CLIPVisionConfig(**TINY_CLIP_VISION)).eval()  # 28x28 pixels: 16 patches + class
    side = TINY_CLIP_VISION["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    transformer = tiny_wan(seed=1, in_channels=36, out_channels=16, image_dim=TINY_CLIP_VISION["hidden_size"],
                           added_kv_proj_dim=24)
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=tiny_umt5(), vae=vae, scheduler=scheduler,
                                   image_processor=processor, image_encoder=encoder, transformer=transformer)


def tiny_wan_i2v_call() -> dict:
    """The arguments of a tiny I2V call: a random 48x32 image, random prompt embeddings, 5 frames, 2 steps."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype("uint8"))
    return dict(image=image, prompt_embeds=torch.randn(1, 512, 16, generator=g),
                negative_prompt_embeds=torch.randn(1, 512, 16, generator=g), height=32, width=48, num_frames=5,
                num_inference_steps=2, guidance_scale=4.0, output_type="pt")
