"""``plan_vae``: an exact low-memory plan for one VAE decode (or encode), for anyone with a diffusers
pipeline and an out-of-memory error at the end of it.

The VAE is profiled on meta tensors of a copy of itself (no memory, seconds; cached), and the
planner picks slicing, groups, host placement and weight streaming that fit ``vram_gb`` — along
frames, along pixels/tokens, and along rows with halos (a single image) — then
``with apply_plan(pipe.vae, plan):`` runs the stock pipeline call under it. The output equals the
unplanned decode (no tiles, no blending).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..planner.errors import InvalidArgumentError, UnsupportedArgumentError
from ..planner.gpus import find_gpu
from ..planner.plan import make_plan
from ..planner.schema import GpuProfile, Plan, SampleShape
from .adapters.base import adapter_for
from .apply import _meta_twin, dtype_name
from .profiler import cached_profile

ENCODE = "vae_encoder"


def vae_shape(vae: torch.nn.Module, shape: Sequence[int], *, encode: bool = False,
              dtype: torch.dtype | None = None) -> SampleShape:
    """The plan shape of a VAE call: latents ``[N, C, h, w]`` (``N`` images), ``[B, T, C, h, w]`` (a
    video's latents as the SVD pipeline holds them), a Wan VAE's ``[B, C, T, h, w]``, or images
    ``[N, 3, H, W]`` with ``encode`` (a Wan VAE: its video ``[B, 3, T, H, W]``, T = 4n+1; the plan shape
    then counts video frames and pixel rows and columns, the sample the encoder sees)."""
    name = type(vae).__name__
    shape = tuple(int(s) for s in shape)
    dtype = dtype or next(vae.parameters()).dtype
    adapter = adapter_for(vae, ENCODE if encode else None)
    video = getattr(adapter, "sample_layout", None) == "bcthw"
    if hasattr(adapter, "input_channels"):  # a video VAE's encode: the video's channels (Wan 2.2: before its patch)
        channels = adapter.input_channels(vae)
    else:
        channels = (vae.encoder.conv_in.in_channels if encode else
                    vae.config.z_dim if video else vae.config.latent_channels)
    what = "videos" if encode and video else "images" if encode else "latents"
    if video and len(shape) == 5:  # a video VAE's latents (or, to encode, its video): [B, C, T, h, w]
        batch, c, frames, h, w = shape
    elif video:
        raise InvalidArgumentError(f"{name}: {what} of shape {shape}: give [B, C, T, h, w].")
    elif len(shape) == 5:
        batch, frames, c, h, w = shape
    elif len(shape) == 4:
        (frames, c, h, w), batch = shape, 1
    else:
        raise InvalidArgumentError(f"{name}: {what} of shape {shape}: give [N, C, h, w] or [B, T, C, h, w].")
    if c != channels:
        raise InvalidArgumentError(
            f"{name} {'encodes' if encode else 'decodes'} {channels}-channel {what}; the shape {shape} has {c} "
            f"channels (is the layout right? latents are [N, C, h, w] or [B, T, C, h, w]; a Wan VAE's [B, C, T, h, w]"
            f"{'' if encode else '; to plan an encode, pass encode=True'}).")
    if min(batch, frames, h, w) < 1:
        raise InvalidArgumentError(f"{name}: {what} of shape {shape} are empty")
    if getattr(vae, "use_tiling", False):
        raise UnsupportedArgumentError(
            f"{name} has tiling enabled (enable_tiling()): tiled decoding blends tiles and changes the output, "
            f"which an exact plan does not reproduce. Call vae.disable_tiling() first; the plan saves the memory.")
    if hasattr(adapter, "check_input"):  # what else the call cannot take (a Wan encode: 4n+1 frames)
        try:
            adapter.check_input(vae, shape)
        except UnsupportedArgumentError as err:
            raise InvalidArgumentError(str(err)) from err
    if (name == "AutoencoderKL" or encode) and not video:  # a flat batch of images: batch 1 x N frames
        batch, frames = 1, batch * frames
    return SampleShape(batch=batch, frames=frames, latent_height=h, latent_width=w, dtype=dtype_name(dtype))


def plan_vae(vae: torch.nn.Module, shape: Sequence[int], vram_gb: float = 2.0, *, encode: bool = False,
             gpu: str | GpuProfile = "RTX 4090", max_latency_s: float | None = None,
             dtype: torch.dtype | None = None) -> Plan:
    """The fastest exact plan of ``vae.decode`` (``encode=True``: ``vae.encode``) on ``shape`` within
    ``vram_gb`` GiB in all (CUDA context, the VAE's weights, activations); ``gpu`` prices latency and
    the context. ``max_latency_s``: the smallest peak within that time instead. Attach it with
    ``with apply_plan(vae, plan):``. Refused with a clear error: latents the VAE cannot take, tiling
    enabled, or a budget below what the smallest slice of some unit needs (the error names it)."""
    sample = vae_shape(vae, shape, encode=encode, dtype=dtype)
    component = ENCODE if encode else None
    adapter_for(vae, component)  # an UnsupportedModelError for a class vramplan has no adapter for
    twin = _meta_twin(vae, getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[sample.dtype]))
    prof = cached_profile(twin, sample, "flash", name=type(vae).__name__, component=component)
    gpu = find_gpu(gpu) if isinstance(gpu, str) else gpu
    return make_plan(prof, gpu, usable_bytes=int(vram_gb * 2**30), steps=1, max_latency_s=max_latency_s)
