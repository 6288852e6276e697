"""``plan_for``: the one call most users need. Imports torch only to profile a new shape.

Every argument is checked here (types, ranges, nan/inf, what the GPU and the pipeline can take),
so the same mistakes get the same clear errors from Python and from the CLI.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .planner.errors import InfeasibleError, InvalidArgumentError, UnsupportedGPUFeatureError, VramplanError
from .planner.fmt import human_bytes
from .planner.gpus import find_gpu
from .planner.pipeline import plan_pipeline
from .planner.pipelines import check_number, pipeline_source, pipeline_spec
from .planner.plan import shipped_pipeline_profile
from .planner.schema import PipelineProfile, Plan, SampleShape

log = logging.getLogger(__name__)

DTYPES = ("fp16", "bf16", "fp32")
ALLOCATORS = ("expandable_segments", "default", "none")
METHODS = ("auto", "ilp", "dp")


def plan_for(
    gpu: str = "auto",
    model: str = "svd",
    height: int = 576,
    width: int = 1024,
    frames: int | None = None,
    guidance: bool = True,
    dtype: str | None = None,
    steps: int = 25,
    vram_gb: float | None = None,
    max_latency_s: float | None = None,
    allocator: str = "expandable_segments",
    method: str = "auto",
    rehash: str = "off",
    calibration=None,
    keys: int | None = None,
    pinned: bool = True,
    host_ram_gb: float | None = None,
    min_psnr: float | None = None,
) -> Plan:
    """A plan that runs the whole ``model`` pipeline at ``height`` x ``width`` x ``frames`` within
    ``gpu``'s memory: per component slicing, groups and weight residency, with a prediction.

    ``gpu``: a name ("2080Ti", "RTX 4090", "A100 80GB") or "auto" (the local GPU and its memory, via NVML).
    ``model``: "svd", "svd-xt", "animatediff", a local pipeline folder (``save_pretrained``) or a Hugging
    Face id whose configs are in the local cache (profiled on meta tensors on first use, then cached).
    ``vram_gb``: plan for this much memory in all instead of the GPU's usable memory.
    ``max_latency_s``: minimise peak memory subject to this latency for the whole run
    (default: minimise latency within memory). ``guidance`` doubles the UNet batch (CFG).
    ``dtype``: "fp16", "bf16" or "fp32"; default the model's own (the Wan models' bf16, else fp16).
    ``rehash``: Step Rehash schedule, "off" | "uniform" | "greedy" | "optimal" (the last two need a
    ``calibration``: a Calibration or its JSON file); ``keys``: how many steps run the whole UNet.
    ``min_psnr`` (with a calibration): the fastest schedule predicted to keep the video within this
    PSNR (dB) of the full run; an error names the best reachable when none does.
    ``pinned=False``: host memory cannot be pinned where the plan runs (container limits on locked
    memory): values placed on host and streamed weights are priced at the pageable transfer rate.
    ``host_ram_gb``: pinned host memory the plan may use for placed values and streamed weights (a plan
    needing more is not chosen). Default: with ``gpu="auto"`` 75% of this machine's RAM, else an
    assumption (:data:`ASSUMED_HOST_RAM_GB`), recorded in the plan's target and printed with it.
    """
    dtype = default_dtype(model) if dtype is None else dtype
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("allocator", allocator, ALLOCATORS)
    _check_choice("method", method, METHODS)
    if not isinstance(guidance, bool):
        raise InvalidArgumentError(f"guidance={guidance!r} must be True or False")
    if not isinstance(pinned, bool):
        raise InvalidArgumentError(f"pinned={pinned!r} must be True or False")
    check_number("steps", steps, integer=True, minimum=1)
    check_number("vram_gb", vram_gb, positive=True, allow_none=True)
    check_number("max_latency_s", max_latency_s, positive=True, allow_none=True)
    check_number("host_ram_gb", host_ram_gb, positive=True, allow_none=True)
    if not isinstance(gpu, str) or not gpu.strip():
        raise InvalidArgumentError(f'gpu={gpu!r} must be a GPU name such as "2080Ti", or "auto"')
    sample_shape_for(model, height, width, frames, guidance, dtype)  # refuses what the model cannot take
    gpu_profile = find_gpu(gpu)
    if dtype == "bf16" and not gpu_profile.bf16:
        raise UnsupportedGPUFeatureError(
            f"{gpu_profile.name} (compute capability {gpu_profile.compute_capability}) has no bf16; "
            f"plan with dtype='fp16' (or fp32) for it."
        )
    usable = None
    if vram_gb is not None:
        usable = int(vram_gb * 2**30)
        if usable > gpu_profile.memory_usable_bytes:
            log.warning(
                "vram_gb=%g is more than %s has (%s usable): planning beyond the card's memory",
                vram_gb, gpu_profile.name, human_bytes(gpu_profile.memory_usable_bytes),
            )
    kernel = gpu_profile.attention_kernel if dtype != "fp32" else "efficient"
    host_bytes, source = host_ram_budget(gpu, host_ram_gb)
    profile = find_pipeline_profile(model, height, width, video_frames(model, frames), guidance, dtype, kernel)
    check_number("min_psnr", min_psnr, positive=True, allow_none=True)
    for name, value in (("keys", keys), ("calibration", calibration), ("min_psnr", min_psnr)):
        if value is not None and rehash == "off":  # would be ignored silently
            raise InvalidArgumentError(f"{name}={value!r} needs rehash='uniform', 'greedy' or 'optimal' "
                                       f"(rehash='off' plans no Step Rehash)")
    if rehash != "off":
        from .planner.rehash import load_calibration, plan_rehash

        cal, ref = load_calibration(calibration)
        plan = plan_rehash(
            profile, gpu_profile, mode=rehash, calibration=cal, calibration_ref=ref, keys=keys, usable_bytes=usable,
            steps=steps, max_latency_s=max_latency_s, allocator=allocator, method=method, pinned=pinned,
            min_psnr=min_psnr,
        )
        return _within_host_budget(plan, host_bytes, source)  # checked after the schedule is chosen
    return plan_pipeline(
        profile, gpu_profile, usable_bytes=usable, steps=steps, max_latency_s=max_latency_s,
        allocator=allocator, method=method, pinned=pinned, host_ram_bytes=host_bytes, host_ram_source=source,
    )


# Pinned host memory assumed for a named GPU when no host_ram_gb is given (a 32 GiB machine, 75% pinnable).
ASSUMED_HOST_RAM_GB = 24.0
PINNABLE_FRACTION = 0.75


def host_ram_budget(gpu: str, host_ram_gb: float | None) -> tuple[int, str]:
    """(bytes, source) of the pinned host memory a plan may use: given, from this machine (gpu="auto"),
    or assumed."""
    if host_ram_gb is not None:
        return int(host_ram_gb * 2**30), "given"
    if gpu.strip().lower() == "auto":
        total = machine_ram_bytes()
        if total:
            return int(total * PINNABLE_FRACTION), f"this machine ({PINNABLE_FRACTION:.0%} of {human_bytes(total)} RAM)"
    return int(ASSUMED_HOST_RAM_GB * 2**30), "assumed; set host_ram_gb= / --host-ram-gb"


def machine_ram_bytes() -> int | None:
    """Physical memory of this machine (None when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _within_host_budget(plan: Plan, budget: int, source: str) -> Plan:
    need = plan.prediction.host_bytes
    if need > budget:
        raise InfeasibleError(
            f"the plan needs {human_bytes(need)} of pinned host memory (placed values, streamed weights), beyond "
            f"the host memory budget of {human_bytes(budget)} ({source}). Give more host memory (host_ram_gb= / "
            f"--host-ram-gb), a GPU with more memory, a smaller resolution or fewer frames."
        )
    return plan.model_copy(update={"target": plan.target.model_copy(
        update={"host_ram_bytes": budget, "host_ram_source": source})})


def sample_shape_for(model: str, height: int, width: int, frames: int | None, guidance: bool, dtype: str) -> SampleShape:
    """The UNet sample shape of a request, or a clear error saying why the model cannot take it."""
    check_number("height", height, integer=True, positive=True)
    check_number("width", width, integer=True, positive=True)
    check_number("frames", frames, integer=True, allow_none=True)
    _check_choice("dtype", dtype, DTYPES)
    source = pipeline_source(model)
    spec = pipeline_spec(source.pipeline)
    spec.check_size(height, width, source.configs)
    if frames is None:
        frames = spec.default_frames(source.entry, source.unet_config)
        if frames is None:
            raise InvalidArgumentError(f"{model!r} has no default frame count: pass frames=")
    spec.check_frames(frames, source.unet_config)
    shape = spec.unet_shape(height, width, frames, guidance, dtype, source.configs)
    check_latent_size(shape, height, width, frames)
    return shape


# Latent positions (frames x latent height x latent width) beyond which a request is refused before
# any profiling: 2^24 is ~70 x the largest shipped shape (SVD-XT 25 x 72x128); one fp16 feature map of
# 320 channels at that size already takes 10 GiB, and profiling it on meta tensors takes minutes.
MAX_LATENT_POSITIONS = 2**24


def check_latent_size(shape: SampleShape, height: int, width: int, frames: int) -> None:
    """Refuse a shape whose latent is absurdly large for any GPU, naming the latent size (in < 1 s)."""
    positions = shape.frames * shape.latent_height * shape.latent_width
    if positions > MAX_LATENT_POSITIONS:
        raise InvalidArgumentError(
            f"{frames} frames at {height}x{width} make a latent of {shape.frames} x {shape.latent_height}x"
            f"{shape.latent_width} = {positions:,} positions, beyond the {MAX_LATENT_POSITIONS:,} vramplan plans "
            f"for (one 320-channel fp16 feature map of it alone is {human_bytes(positions * 320 * 2)}): no GPU holds "
            f"it. Use fewer frames or a smaller resolution."
        )


def default_dtype(model: str) -> str:
    """The dtype a model's weights are published in (its catalogue entry's ``dtype``), else fp16: what
    a plan is made for when none is named."""
    from .profiles import model_catalogue

    entry = model_catalogue().get(model.lower()) if isinstance(model, str) else None
    return (entry or {}).get("dtype", "fp16")


def video_frames(model: str, frames: int | None) -> int:
    """The video's frame count of a request (the model's default when None): what pipeline profiles are
    keyed by. Not the sample's frames, which a video VAE compresses (Wan: 81 frames, 21 latents)."""
    if frames is not None:
        return frames
    source = pipeline_source(model)
    return pipeline_spec(source.pipeline).default_frames(source.entry, source.unet_config)


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
    log.info("profiling the %s pipeline at %d x %dx%d (%s attention) on meta tensors; cached",
             model, frames, height, width, kernel)
    return cached_pipeline_profile(model, height, width, frames, guidance, dtype, kernel)


def load_plan(path: str | Path) -> Plan:
    """Read a plan file (clear errors for corrupt, oversized or future-version files, and a
    :class:`~vramplan.planner.errors.PlanIntegrityError` naming the field of a plan that disagrees with
    itself or with its model's shipped profile: its prediction is recomputed, never trusted)."""
    return Plan.load(path)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(f"{name}={value!r}: choose one of {', '.join(choices)}")
