"""The small trained image-to-video model shipped in ``vramplan/profiles/trained``.

A real ``StableVideoDiffusionPipeline`` (tiny UNet, tiny temporal-decoder VAE, a frozen random CLIP image
encoder, SVD's Euler scheduler) trained by ``bench/train_tiny_svd.py`` on the procedural clips of
``runtime/clips.py``. Random weights say nothing about quality; this model does continue a first frame, so
quality losses (of Step Rehash, of any approximation) can be measured on it against true held-out clips.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from ..planner.errors import InputFileError
from .clips import heldout_clip, to_pil

# What the model was trained for (and what the measurements use).
HEIGHT = WIDTH = 32
NUM_FRAMES = 8
NUM_INFERENCE_STEPS = 25
FPS = 7  # the pipeline conditions on fps - 1
MOTION_BUCKET_ID = 127
NOISE_AUG_STRENGTH = 0.02
CFG_DROPOUT = 0.1  # training drops image latents + embedding together, as the pipeline's negative branch
TRAINED_DIR = "trained"
COMPONENTS = ("unet", "vae", "image_encoder")

UNET_CONFIG = dict(
    sample_size=HEIGHT // 2,
    in_channels=8,
    out_channels=4,
    # GroupNorm has 32 groups: 64 channels keep two per group, so that the output norm does not erase each
    # channel's mean (one channel per group could not set a frame's colour). No attention at the 16x16
    # level (the costliest on CPU); motion there comes from the temporal resnets.
    block_out_channels=(64, 64, 64),
    down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                      "CrossAttnDownBlockSpatioTemporal"),
    up_block_types=("CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"),
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24,
    layers_per_block=1,
    cross_attention_dim=32,
    num_attention_heads=(2, 4, 4),
    num_frames=NUM_FRAMES,
)
VAE_CONFIG = dict(
    block_out_channels=(64, 64),  # two channels per GroupNorm group, as the UNet
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    layers_per_block=1,
    latent_channels=4,
    sample_size=HEIGHT,
)
CLIP_CONFIG = dict(hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, image_size=224, patch_size=32)
# Stable Video Diffusion's scheduler config (stabilityai/stable-video-diffusion-img2vid, scheduler/).
SCHEDULER_CONFIG = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
    prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True,
    timestep_spacing="leading", timestep_type="continuous", steps_offset=1, sigma_min=0.002, sigma_max=700.0,
)


def build_pipeline(seed: int = 0, unet_config: dict | None = None, vae_config: dict | None = None,
                   clip_config: dict | None = None):
    """A randomly initialised pipeline; with equal configs and seed, exactly the training's start point."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(**(unet_config or UNET_CONFIG))
    vae = AutoencoderKLTemporalDecoder(**(vae_config or VAE_CONFIG))
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**(clip_config or CLIP_CONFIG)))
    pipe = StableVideoDiffusionPipeline(
        vae=vae.eval(), image_encoder=encoder.eval(), unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        feature_extractor=CLIPImageProcessorPil(crop_size=224, size=224),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_dir() -> Path:
    return Path(str(resources.files("vramplan.profiles").joinpath(TRAINED_DIR)))


def require_files(folder: Path, needed: list[Path], what: str, retrain: str) -> None:
    """InputFileError naming every file of a shipped trained model that is missing, and how to get it back."""
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise InputFileError(f"{what} is incomplete in {folder}: missing {', '.join(missing)}. Reinstall vramplan, "
                             f"or retrain it with {retrain}.")


def _check_files(folder: Path) -> None:
    needed = [folder / "model_index.json"] + [folder / c / "config.json" for c in COMPONENTS]
    needed += [folder / "vae" / "diffusion_pytorch_model.safetensors",
               folder / "unet" / "diffusion_pytorch_model.safetensors",
               folder / "image_encoder" / "model.safetensors"]
    require_files(folder, needed, "the trained model",
                  "`python bench/train_tiny_svd.py` (about 30 minutes on 2 CPU cores)")


def trained_svd_pipeline(folder: str | Path | None = None):
    """The shipped trained pipeline (fp32, CPU, eval mode, progress bar off)."""
    from diffusers import StableVideoDiffusionPipeline

    folder = Path(folder) if folder is not None else trained_dir()
    _check_files(folder)
    pipe = StableVideoDiffusionPipeline.from_pretrained(str(folder))  # saved in fp32
    for name in COMPONENTS:
        getattr(pipe, name).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def untrained_svd_pipeline(folder: str | Path | None = None, seed: int = 0):
    """The shipped configs with random weights: exactly the model before training (the baseline)."""
    import json

    folder = Path(folder) if folder is not None else trained_dir()
    _check_files(folder)

    def config(name):
        data = json.loads((folder / name / "config.json").read_text())
        return {k: v for k, v in data.items() if not k.startswith("_")}

    clip = {k: v for k, v in config("image_encoder").items() if k in CLIP_CONFIG}
    return build_pipeline(seed, config("unet"), config("vae"), clip)


def heldout_example(index: int):
    """Held-out clip ``index`` as ``[NUM_FRAMES, 3, H, W]`` in [-1, 1] and its first frame as a PIL image."""
    clip = heldout_clip(index, NUM_FRAMES, HEIGHT)
    return clip, to_pil(clip[0])


def sample(pipe, image, seed: int = 0, num_inference_steps: int = NUM_INFERENCE_STEPS, **kwargs) -> torch.Tensor:
    """One video for a first-frame PIL image: ``[NUM_FRAMES, 3, H, W]`` in [-1, 1]."""
    frames = pipe(image=image, height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES,
                  num_inference_steps=num_inference_steps, decode_chunk_size=NUM_FRAMES, fps=FPS,
                  motion_bucket_id=MOTION_BUCKET_ID, noise_aug_strength=NOISE_AUG_STRENGTH,
                  generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).frames[0]
    return frames * 2 - 1


def psnr(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR (dB) of ``[F, 3, H, W]`` videos in [-1, 1] (peak-to-peak range 2)."""
    mse = (video.float() - reference.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def ssim(video: torch.Tensor, reference: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Per-frame SSIM with a Gaussian window (sigma 1.5), on [0, 1] intensities, averaged over channels."""
    x, y = (video.float() + 1) / 2, (reference.float() + 1) / 2
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-coords.square() / (2 * 1.5**2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(3, 1, window, window)

    def blur(t):
        return torch.nn.functional.conv2d(t, kernel, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return value.flatten(1).mean(1)
