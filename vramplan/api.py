"""``plan_for``: the one call most users need. Imports torch only to profile a new shape."""

from __future__ import annotations

import logging
from pathlib import Path

from .planner.errors import VramplanError
from .planner.gpus import find_gpu
from .planner.pipeline import plan_pipeline
from .planner.plan import shipped_pipeline_profile
from .planner.schema import PipelineProfile, Plan, SampleShape
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
    rehash: str = "off",
    calibration=None,
    keys: int | None = None,
) -> Plan:
    """A plan that runs the whole ``model`` pipeline at ``height`` x ``width`` x ``frames`` within
    ``gpu``'s memory: per component slicing, groups and weight residency, with a prediction.

    ``gpu``: a name ("2080Ti", "RTX 4090", "A100 80GB") or "auto" (the local GPU, via NVML).
    ``model``: "svd", "svd-xt", a Hugging Face id (config read from the local cache) or a local path.
    ``vram_gb``: plan for this much memory in all instead of the GPU's usable memory.
    ``max_latency_s``: minimise peak memory subject to this latency for the whole run
    (default: minimise latency within memory). ``guidance`` doubles the UNet batch (CFG).
    ``rehash``: Step Rehash schedule, "off" | "uniform" | "greedy" | "optimal" (the last two need a
    ``calibration``: a Calibration or its JSON file); ``keys``: how many steps run the whole UNet.
    """
    gpu_profile = find_gpu(gpu)
    shape = sample_shape_for(model, height, width, frames, guidance, dtype)
    kernel = gpu_profile.attention_kernel if dtype != "fp32" else "efficient"
    profile = find_pipeline_profile(model, height, width, shape.frames, guidance, dtype, kernel)
    usable = int(vram_gb * 2**30) if vram_gb is not None else None
    if rehash != "off":
        from .planner.rehash import load_calibration, plan_rehash

        cal, ref = load_calibration(calibration)
        return plan_rehash(
            profile, gpu_profile, mode=rehash, calibration=cal, calibration_ref=ref, keys=keys, usable_bytes=usable,
            steps=steps, max_latency_s=max_latency_s, allocator=allocator, method=method,
        )
    return plan_pipeline(
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


def find_pipeline_profile(
    model: str, height: int, width: int, frames: int, guidance: bool, dtype: str, kernel: str
) -> PipelineProfile:
    """A shipped pipeline profile if one matches; otherwise profile it (needs torch, ~30 s, cached)."""
    shipped = shipped_pipeline_profile(model, height, width, frames, guidance, dtype, kernel)
    if shipped is not None:
        return shipped
    try:
        from .runtime.profiler import cached_pipeline_profile
    except ImportError as err:
        raise VramplanError(
            f"no shipped profile for {model} {frames} x {height}x{width} ({kernel} attention), and profiling "
            f"one needs the runtime: pip install 'vramplan[runtime]'"
        ) from err
    log.info("profiling the %s pipeline at %d x %dx%d (%s attention); cached", model, frames, height, width, kernel)
    return cached_pipeline_profile(model, height, width, frames, guidance, dtype, kernel)


def load_plan(path: str | Path) -> Plan:
    """Read a plan file (clear errors for corrupt or future-version files)."""
    return Plan.load(path)
