"""AnimateDiff (``AnimateDiffPipeline``) as a whole: stages, held tensors, profiling.

``AnimateDiffPipeline.__call__`` encodes the prompt and the negative prompt with the CLIP text
encoder, runs ``UNetMotionModel`` once per step (CFG: batch 2), decodes the frames with the SD
``AutoencoderKL`` (``decode_chunk_size`` frames at a time; frames are independent there, so any
chunking is exact: vramplan decodes all at once, sliced) and post-processes them.
"""

from __future__ import annotations

import torch

from ...planner.schema import PipelineProfile, SampleShape, StageProfile

PIPELINE = "AnimateDiffPipeline"
# Entry points of the stages, in call order: (stage, component, method).
STAGES = [("encode_text", "text_encoder", "forward"), ("denoise", "unet", "forward"), ("decode", "vae", "decode")]
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def measure_whole_stages(components: dict, height: int, width: int, dtype: str, kernel: str) -> dict:
    """Activation peak, FLOPs and bytes of the one stage that runs unsliced: the text encoder (once)."""
    from ..profiler import measure_stage

    text = components["text_encoder"]
    tokens = torch.zeros(1, text.config.max_position_embeddings, dtype=torch.long, device="meta")
    return {"encode_text": measure_stage(lambda: text(tokens), kernel)}


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
    """Profile AnimateDiff from its meta components ``unet``, ``vae`` and ``text_encoder``."""
    from ..profiler import component_profiles, profile

    say = progress or (lambda _msg: None)
    unet, vae, text = components["unet"], components["vae"], components["text_encoder"]
    size = _BYTES[dtype]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = height // scale, width // scale
    batch = 2 if guidance else 1

    say("text encoder")
    act, flops, moved = measure_whole_stages(components, height, width, dtype, kernel)["encode_text"]
    say("UNet")
    unet_profile = profile(unet, SampleShape(batch=batch, frames=frames, latent_height=h, latent_width=w,
                                             dtype=dtype), kernel, name=name, max_k=max_k, progress=say)
    say("VAE decoder")
    dec_profile = profile(vae, SampleShape(batch=1, frames=frames, latent_height=h, latent_width=w, dtype=dtype),
                          kernel, name=name, max_k=max_k, progress=say)

    latent = frames * vae.config.latent_channels * h * w * size
    embeds = batch * text.config.max_position_embeddings * text.config.hidden_size * size
    frames_px = frames * 3 * height * width
    stages = [
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
    comps = component_profiles(components, name, {"unet": unet_profile.model, "vae": dec_profile.model})
    return PipelineProfile(
        model_name=name, pipeline=PIPELINE, height=height, width=width, frames=frames, guidance=guidance,
        dtype=dtype, attention_kernel=kernel, components=comps, stages=stages, versions=unet_profile.versions,
    )

