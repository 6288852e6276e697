"""Stable Video Diffusion as a whole, the torch parts: measuring its unsliced stages, the stage
profiles, loading. The torch-free facts (stages, shapes, call arguments) are
:class:`vramplan.planner.pipelines.StableVideoDiffusion`.

``StableVideoDiffusionPipeline.__call__`` runs: the CLIP image encoder on the conditioning image,
the VAE encoder on it (upcast to fp32 when ``force_upcast``), the UNet once per step (CFG: batch
2), the temporal VAE decoder on all frames (``decode_chunk_size=num_frames``: exact), and a
post-processing of the frames. The UNet and the decoder are sliced by plans; the other stages are
measured whole. Everything is traced on meta tensors of the full-size components.
"""

from __future__ import annotations

import torch

from ...planner.pipelines import StableVideoDiffusion, register
from ...planner.schema import ModelProfile, StageProfile
from ..fake import weight_bytes
from .base import PipelineAdapter, measure_stage, quiet_diffusers

_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@register
class StableVideoDiffusionAdapter(PipelineAdapter, StableVideoDiffusion):
    def measure_whole_stages(self, components: dict, height: int, width: int, dtype: str, kernel: str) -> dict:
        """Activation peak, FLOPs and bytes of the stages that run unsliced: the two encoders."""
        vae, encoder = components["vae"], components["image_encoder"]
        dtype_ = next(encoder.parameters()).dtype
        side = encoder.config.image_size
        pixels = torch.empty(1, 3, side, side, device="meta", dtype=dtype_)
        out = {"encode_image": measure_stage(lambda: encoder(pixels), kernel)}
        vae_dtype = torch.float32 if self._upcast(vae, dtype) else dtype_
        with quiet_diffusers():  # .to(dtype) warns about fp32 modules; the pipeline does it
            try:
                vae.to(vae_dtype)
                img = torch.empty(1, 3, height, width, device="meta", dtype=vae_dtype)
                out["encode_vae"] = measure_stage(lambda: vae.encode(img).latent_dist.mode(), kernel)
            finally:
                vae.to(dtype_)
        return out

    def stage_profiles(self, components: dict, height: int, width: int, frames: int, guidance: bool, dtype: str,
                       whole: dict, profiles: dict[str, ModelProfile]) -> list[StageProfile]:
        vae, encoder = components["vae"], components["image_encoder"]
        unet_profile, dec_profile = profiles["denoise"], profiles["decode"]
        size = _BYTES[dtype]
        shape = unet_profile.shape
        batch = shape.batch
        latent = frames * vae.config.latent_channels * shape.latent_height * shape.latent_width * size
        image = 3 * height * width * size
        embeds = batch * encoder.config.projection_dim * size
        frames_px = frames * 3 * height * width
        return [
            StageProfile(stage="encode_image", component="image_encoder", activation_bytes=whole["encode_image"][0],
                         flops=whole["encode_image"][1], bytes_moved=whole["encode_image"][2], held_bytes=image),
            StageProfile(stage="encode_vae", component="vae", activation_bytes=whole["encode_vae"][0],
                         flops=whole["encode_vae"][1], bytes_moved=whole["encode_vae"][2], held_bytes=image + embeds,
                         extra_weight_bytes=weight_bytes(vae) if self._upcast(vae, dtype) else 0),
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

    @staticmethod
    def _upcast(vae, dtype: str) -> bool:
        return dtype == "fp16" and bool(vae.config.get("force_upcast", False))
