"""A tiny Stable Video Diffusion pipeline built in code: the real diffusers/transformers classes,
small configs, random weights. For the demo and the tests: it shows the machinery (random weights
make noise, not video) without downloading anything."""

from __future__ import annotations

import torch

TINY_UNET = dict(
    sample_size=8,
    in_channels=8,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24,
    layers_per_block=1,
    cross_attention_dim=16,
    num_attention_heads=(2, 4),
    num_frames=5,
)
TINY_VAE = dict(
    block_out_channels=(32, 32),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    layers_per_block=1,
    latent_channels=4,
)


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norm affines and mixing factors, so that every path of the model matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor") or "norm" in name:
                noise = torch.randn(p.shape, generator=gen) * 0.5
                p.copy_(noise + (1.0 if name.endswith("weight") else 0.0))
    return model


def tiny_svd_pipeline(seed: int = 0):
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = randomize_norms(UNetSpatioTemporalConditionModel(**TINY_UNET), seed)
    vae = randomize_norms(AutoencoderKLTemporalDecoder(**TINY_VAE), seed + 1)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=224, patch_size=32,
    ))
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
        interpolation_type="linear", use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae.eval(), image_encoder=encoder.eval(), unet=unet.eval(), scheduler=scheduler,
        feature_extractor=CLIPImageProcessorPil(crop_size=224, size=224),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_MOTION_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
    up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=16,
    num_attention_heads=2,
    motion_max_seq_length=16,
    motion_num_attention_heads=2,
    use_motion_mid_block=True,
)
TINY_SD_VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    norm_num_groups=8,
    layers_per_block=1,
    latent_channels=4,
)


def tiny_animatediff_pipeline(seed: int = 0):
    """AnimateDiff with tiny components. It has no tokenizer: pass ``prompt_embeds``."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = randomize_norms(UNetMotionModel(**TINY_MOTION_UNET), seed)
    vae = randomize_norms(AutoencoderKL(**TINY_SD_VAE), seed + 1)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=1000, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_schedule="linear", steps_offset=1, clip_sample=False)
    pipe = AnimateDiffPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=None, unet=unet.eval(),
                               motion_adapter=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
