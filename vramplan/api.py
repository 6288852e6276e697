"""``plan_for``: the one call most users need. Imports torch only to profile a new shape."""

from __future__ import annotations

import logging
from pathlib import Path

from .planner.errors import VramplanError
from .planner.gpus import find_gpu
from .planner.plan import make_plan, shipped_profile
from .planner.schema import ModelProfile, Plan, SampleShape
from .profiles import model_catalogue

log = logging.getLogger(__name__)

VAE_SCALE_FACTOR = 8
MIN_LATENT = 8  # the UNets downsample latents three times


def plan_for(
    gpu: str = "auto",
    model: str = "svd",
    height: int = 576,
    width: int = 1024,
    frames: int | None = None,
    guidance: bool = True,
    dtype: str = "fp16",
    steps: int = 25,
    vram_gb: float | None = None,
    max_latency_s: float | None = None,
    allocator: str = "expandable_segments",
    method: str = "auto",
) -> Plan:
    """A plan that runs ``model`` at ``height`` x ``width`` x ``frames`` within ``gpu``'s memory.

    ``gpu``: a name ("2080Ti", "RTX 4090", "A100 80GB") or "auto" (the local GPU, via NVML).
    ``model``: "svd", "svd-xt", a Hugging Face id (config read from the local cache) or a local path.
    ``vram_gb``: plan for this much memory in all instead of the GPU's usable memory.
    ``max_latency_s``: minimise peak memory subject to this latency for ``steps`` UNet calls
    (default: minimise latency within memory). ``guidance`` doubles the UNet batch (CFG).
    """
    gpu_profile = find_gpu(gpu)
    shape = sample_shape_for(model, height, width, frames, guidance, dtype)
    kernel = gpu_profile.attention_kernel if dtype != "fp32" else "efficient"
    profile = find_profile(model, shape, kernel)
    usable = int(vram_gb * 2**30) if vram_gb is not None else None
    return make_plan(
        profile, gpu_profile, usable_bytes=usable, steps=steps, max_latency_s=max_latency_s,
        allocator=allocator, method=method,
    )


def sample_shape_for(model: str, height: int, width: int, frames: int | None, guidance: bool, dtype: str) -> SampleShape:
    """The UNet sample shape of a request, or a clear error saying why the model cannot take it."""
    for label, value in (("height", height), ("width", width)):
        if value % VAE_SCALE_FACTOR:
            raise VramplanError(
                f"{label}={value} is not a multiple of {VAE_SCALE_FACTOR}: the VAE encodes {VAE_SCALE_FACTOR}x"
                f"{VAE_SCALE_FACTOR} pixels into one latent. Try {label}={round(value / 8) * 8}."
            )
        if value // VAE_SCALE_FACTOR < MIN_LATENT:
            raise VramplanError(
                f"{label}={value} is too small: the UNet downsamples latents three times, so it needs at "
                f"least {MIN_LATENT * VAE_SCALE_FACTOR} pixels."
            )
    entry = model_catalogue().get(model.lower())
    if frames is None:
        if entry is None:
            raise VramplanError(f"frames is required for {model!r} (no default frame count known)")
        frames = entry["frames"]
    if frames < 1:
        raise VramplanError(f"frames={frames}: a video needs at least one frame")
    if dtype not in ("fp16", "bf16", "fp32"):
        raise VramplanError(f"dtype={dtype!r}: choose fp16, bf16 or fp32")
    return SampleShape(
        batch=2 if guidance else 1,
        frames=frames,
        latent_height=height // VAE_SCALE_FACTOR,
        latent_width=width // VAE_SCALE_FACTOR,
        dtype=dtype,
    )


def find_profile(model: str, shape: SampleShape, kernel: str) -> ModelProfile:
    """A shipped profile if one matches; otherwise profile the model (needs torch, ~20 s, cached)."""
    shipped = shipped_profile(model, shape, kernel)
    if shipped is not None:
        return shipped
    try:
        from .runtime.models import meta_unet
        from .runtime.profiler import cached_profile
    except ImportError as err:
        raise VramplanError(
            f"no shipped profile for {model} at {shape.describe()} ({kernel} attention), and profiling "
            f"one needs the runtime: pip install 'vramplan[runtime]'"
        ) from err
    log.info("profiling %s at %s (%s attention); cached for next time", model, shape.describe(), kernel)
    unet = meta_unet(model, shape.dtype)
    return cached_profile(unet, shape, kernel, name=model)


def load_plan(path: str | Path) -> Plan:
    """Read a plan file (clear errors for corrupt or future-version files)."""
    return Plan.load(path)
