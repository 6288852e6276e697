"""AnimateDiff as a whole, the torch parts: measuring the text encoder, the stage profiles, and
loading (a base Stable Diffusion 1.5 pipeline plus a ``MotionAdapter``). The torch-free facts are
:class:`vramplan.planner.pipelines.AnimateDiff`.

``AnimateDiffPipeline.__call__`` encodes the prompt and the negative prompt with the CLIP text
encoder, runs ``UNetMotionModel`` once per step (CFG: batch 2), decodes the frames with the SD
``AutoencoderKL`` (``decode_chunk_size`` frames at a time; frames are independent there, so any
chunking is exact: vramplan decodes all at once, sliced) and post-processes them.
"""

from __future__ import annotations

import torch

from ...planner.pipelines import AnimateDiff, register
from ...planner.schema import ModelProfile, StageProfile
from .base import PipelineAdapter, measure_stage

_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@register
class AnimateDiffAdapter(PipelineAdapter, AnimateDiff):
    def measure_whole_stages(self, components: dict, height: int, width: int, dtype: str, kernel: str) -> dict:
        """Activation peak, FLOPs and bytes of the one stage that runs unsliced: the text encoder (once)."""
        text = components["text_encoder"]
        tokens = torch.zeros(1, text.config.max_position_embeddings, dtype=torch.long, device="meta")
        return {"encode_text": measure_stage(lambda: text(tokens), kernel)}

    def stage_profiles(self, components: dict, height: int, width: int, frames: int, guidance: bool, dtype: str,
                       whole: dict, profiles: dict[str, ModelProfile]) -> list[StageProfile]:
        vae, text = components["vae"], components["text_encoder"]
        unet_profile, dec_profile = profiles["denoise"], profiles["decode"]
        act, flops, moved = whole["encode_text"]
        size = _BYTES[dtype]
        shape = unet_profile.shape
        batch = shape.batch
        latent = frames * vae.config.latent_channels * shape.latent_height * shape.latent_width * size
        embeds = batch * text.config.max_position_embeddings * text.config.hidden_size * size
        frames_px = frames * 3 * height * width
        return [
            StageProfile(stage="encode_text", component="text_encoder", activation_bytes=act, flops=batch * flops,
                         bytes_moved=batch * moved, held_bytes=embeds),
            # Held across steps: latents, the CFG-doubled UNet input, the prompt embeddings.
            StageProfile(stage="denoise", component="unet", per_step=True, profile=unet_profile,
                         activation_bytes=unet_profile.original_peak_bytes, held_bytes=latent + batch * latent + embeds),
            # decode_latents scales the latents and reshapes them to frames (two copies).
            StageProfile(stage="decode", component="vae", profile=dec_profile,
                         activation_bytes=dec_profile.original_peak_bytes, held_bytes=3 * latent),
            # torch.cat of the decoded frames, the reshape/permute, the fp32 cast and postprocess_video.
            StageProfile(stage="postprocess", component="none", activation_bytes=frames_px * (2 * size + 4 + 8),
                         bytes_moved=frames_px * 24, held_bytes=frames_px * size),
        ]

    def load(self, source: str, dtype: torch.dtype, local_files_only: bool, entry: dict | None = None):
        """A base SD 1.5 pipeline plus the catalogue's motion adapter (or a saved AnimateDiff pipeline)."""
        import diffusers

        adapter_id = (entry or {}).get("motion_adapter")
        if not adapter_id:
            return super().load(source, dtype, local_files_only, entry)
        motion = self._from_pretrained(diffusers.MotionAdapter, adapter_id, dtype, local_files_only)
        return self._from_pretrained(self.pipeline_class(), source, dtype, local_files_only, motion_adapter=motion)
