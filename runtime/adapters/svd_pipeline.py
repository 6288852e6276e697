"""Stable Video Diffusion as a whole: its stages, what each holds, and how to profile them.

``StableVideoDiffusionPipeline.__call__`` runs: the CLIP image encoder on the conditioning image,
the VAE encoder on it (upcast to fp32 when ``force_upcast``), the UNet once per step (CFG: batch
2), the temporal VAE decoder on all frames (``decode_chunk_size=num_frames``: exact), and a
post-processing of the frames. The UNet and the decoder are sliced by plans; the other stages are
measured whole. Everything is traced on meta tensors of the full-size components.
"""

from __future__ import annotations

import torch

from ...planner.schema import PipelineProfile, SampleShape, StageProfile
from ..fake import weight_bytes

PIPELINE = "StableVideoDiffusionPipeline"
# Entry points of the stages, in call order: (stage, component, method).
STAGES = [("encode_image", "image_encoder", "forward"), ("encode_vae", "vae", "encode"),
          ("denoise", "unet", "forward"), ("decode", "vae", "decode")]
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def measure_whole_stages(components: dict, height: int, width: int, dtype: str, kernel: str) -> dict:
    """Activation peak, FLOPs and bytes of the stages that run unsliced: the two encoders."""
    from diffusers.utils import logging as diffusers_logging

    from ..profiler import measure_stage

    vae, encoder = components["vae"], components["image_encoder"]
    dtype_ = next(encoder.parameters()).dtype
    side = encoder.config.image_size
    pixels = torch.empty(1, 3, side, side, device="meta", dtype=dtype_)
    out = {"encode_image": measure_stage(lambda: encoder(pixels), kernel)}
    upcast = dtype == "fp16" and vae.config.get("force_upcast", False)
    vae_dtype = torch.float32 if upcast else dtype_
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(dtype) warns about fp32 modules; the pipeline does it
    try:
        vae.to(vae_dtype)
        img = torch.empty(1, 3, height, width, device="meta", dtype=vae_dtype)
        out["encode_vae"] = measure_stage(lambda: vae.encode(img).latent_dist.mode(), kernel)
    finally:
        vae.to(dtype_)
        diffusers_logging.set_verbosity(level)
    return out


def profile_pipeline(
    components: dict[str, torch.nn.Module],
    name: str,
    height: int,
    width: int,
    frames: int,
    guidance: bool = True,
    dtype: str = "fp16",
    kernel: str = "flash",
    max_k: int = 256,
    progress=None,
) -> PipelineProfile:
    """Profile SVD's pipeline from its meta components ``unet``, ``vae`` and ``image_encoder``."""
    from ..profiler import component_profiles, profile

    say = progress or (lambda _msg: None)
    unet, vae, encoder = components["unet"], components["vae"], components["image_encoder"]
    size = _BYTES[dtype]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = height // scale, width // scale
    batch = 2 if guidance else 1
    latent = frames * vae.config.latent_channels * h * w * size
    image = 3 * height * width * size
    say("image and VAE encoders")
    whole = measure_whole_stages(components, height, width, dtype, kernel)
    upcast = dtype == "fp16" and vae.config.get("force_upcast", False)

    say("UNet")
    unet_shape = SampleShape(batch=batch, frames=frames, latent_height=h, latent_width=w, dtype=dtype)
    unet_profile = profile(unet, unet_shape, kernel, name=name, max_k=max_k, progress=say)
    say("VAE decoder")
    dec_shape = SampleShape(batch=1, frames=frames, latent_height=h, latent_width=w, dtype=dtype)
    dec_profile = profile(vae, dec_shape, kernel, name=name, max_k=max_k, progress=say)

    embeds = batch * encoder.config.projection_dim * size
    frames_px = frames * 3 * height * width
    stages = [
        StageProfile(stage="encode_image", component="image_encoder", activation_bytes=whole["encode_image"][0],
                     flops=whole["encode_image"][1], bytes_moved=whole["encode_image"][2], held_bytes=image),
        StageProfile(stage="encode_vae", component="vae", activation_bytes=whole["encode_vae"][0],
                     flops=whole["encode_vae"][1], bytes_moved=whole["encode_vae"][2], held_bytes=image + embeds,
                     extra_weight_bytes=weight_bytes(vae) if upcast else 0),
        # Held across steps: latents, CFG image latents, the UNet input (latents + image latents).
        StageProfile(stage="denoise", component="unet", per_step=True, profile=unet_profile,
                     activation_bytes=unet_profile.original_peak_bytes,
                     held_bytes=latent + batch * latent + 2 * batch * latent + embeds),
        StageProfile(stage="decode", component="vae", profile=dec_profile,
                     activation_bytes=dec_profile.original_peak_bytes, held_bytes=2 * latent),
        # decode_latents concatenates the decoded chunks and casts them to fp32; postprocess_video
        # rescales and clamps: about 14 bytes per output value on the GPU before the copy to the CPU.
        StageProfile(stage="postprocess", component="none", activation_bytes=frames_px * (size + 4 + 8),
                     bytes_moved=frames_px * 24, held_bytes=frames_px * size),
    ]
    comps = component_profiles(components, name, {"unet": unet_profile.model, "vae": dec_profile.model})
    return PipelineProfile(
        model_name=name, pipeline=PIPELINE, height=height, width=width, frames=frames, guidance=guidance,
        dtype=dtype, attention_kernel=kernel, components=comps, stages=stages,
        versions=unet_profile.versions,
    )

