"""Stable Video Diffusion as a whole, the torch parts: measuring its unsliced stages, the stage
profiles, loading. The torch-free facts (stages, shapes, call arguments) are
:class:`vramplan.planner.pipelines.StableVideoDiffusion`.

``StableVideoDiffusionPipeline.__call__`` runs: the CLIP image encoder on the conditioning image,
the VAE encoder on it (upcast to fp32 when ``force_upcast``), the UNet once per step (CFG: batch
2), the temporal VAE decoder on all frames (``decode_chunk_size=num_frames``: exact), and a
post-processing of the frames. Every model stage is planned: the image encoder (through the CLIP
adapter: its layers stream, nothing is sliced), the VAE encode (rows with halos, under its own plan
``vae_encoder``: ``vae`` holds the decode's), the UNet and the decoder. Everything is traced on meta
tensors of the full-size components.

The encode's blocks are not offered for streaming when the pipeline upcasts the VAE: it converts
the whole VAE in place (``vae.to(float32)``) around the encode, which a streamed block's host copy
(kept in the load dtype) would not follow.
"""

from __future__ import annotations

import contextlib

import torch

from ...planner.pipelines import StableVideoDiffusion, register
from ...planner.schema import ModelProfile, StageProfile
from ..fake import weight_bytes
from .base import PipelineAdapter, quiet_diffusers

_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Slice counts the pipeline's encode is planned with, at most: rows segments are priced slice by slice, so
# every larger k costs planning time (1.9 s instead of 0.35 s for a 576x1024 plan), and the encode's floor is
# its mid-block attention (unsliced, 126 MiB at 576x1024) from k = 16 on anyway.
ENCODE_MAX_K = 16


@register
class StableVideoDiffusionAdapter(PipelineAdapter, StableVideoDiffusion):
    def measure_whole_stages(self, components: dict, height: int, width: int, dtype: str, kernel: str) -> dict:
        """Activation peak, FLOPs and bytes of the stages that run unsliced: none (every stage is planned)."""
        return {}

    @contextlib.contextmanager
    def stage_dtype(self, components: dict, stage: str, dtype: str):
        """The VAE in fp32 while its encode is profiled, as the pipeline upcasts it (``force_upcast``)."""
        vae = components["vae"]
        if stage != "encode_vae" or not self._upcast(vae, dtype):
            yield
            return
        before = next(vae.parameters()).dtype
        with quiet_diffusers():  # .to(dtype) warns about fp32 modules; the pipeline does it
            vae.to(torch.float32)
            try:
                yield
            finally:
                vae.to(before)

    def stage_profiles(self, components: dict, height: int, width: int, frames: int, guidance: bool, dtype: str,
                       whole: dict, profiles: dict[str, ModelProfile]) -> list[StageProfile]:
        vae, encoder = components["vae"], components["image_encoder"]
        unet_profile, dec_profile, enc_profile = profiles["denoise"], profiles["decode"], profiles["encode_vae"]
        upcast = self._upcast(vae, dtype)
        units = [u.model_copy(update={"scratch": {k: v for k, v in u.scratch.items() if k <= ENCODE_MAX_K}})
                 for u in enc_profile.units]
        enc_profile = enc_profile.model_copy(update={"units": units})
        if upcast:  # the in-place upcast would not follow a streamed block's host copy: nothing streams
            enc_profile = enc_profile.model_copy(update={"block_weights": {}, "block_gathered": {}})
        size = _BYTES[dtype]
        shape = unet_profile.shape
        batch = shape.batch
        latent = frames * vae.config.latent_channels * shape.latent_height * shape.latent_width * size
        image = 3 * height * width * size
        noised = 2 * 3 * height * width * 4  # the VAE's input: the preprocessed image (fp32) and its noise
        embeds = batch * encoder.config.projection_dim * size
        frames_px = frames * 3 * height * width
        return [
            # The CLIP image encoder through its adapter: one unit and streamable block per layer.
            StageProfile(stage="encode_image", component="image_encoder", profile=profiles["encode_image"],
                         activation_bytes=profiles["encode_image"].original_peak_bytes, held_bytes=image),
            # The encode's own plan (vae holds the decode's).
            StageProfile(stage="encode_vae", component="vae", plan_component="vae_encoder", profile=enc_profile,
                         activation_bytes=enc_profile.original_peak_bytes, held_bytes=noised + embeds,
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

    @staticmethod
    def _upcast(vae, dtype: str) -> bool:
        return dtype == "fp16" and bool(vae.config.get("force_upcast", False))
