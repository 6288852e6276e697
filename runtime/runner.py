"""``run(plan)``: execute a plan on a real diffusers pipeline and measure it.

The pipeline is loaded from a local path or the local Hugging Face cache (never downloaded unless
asked), or passed in. Each sliced component gets its part of the plan; components the plan does
not keep resident are given accelerate offload hooks (moved to the GPU for their stage, off
before another stage starts); the pipeline runs as usual, with its progress bar; everything is
restored afterwards. On CUDA the caching allocator's expandable segments are turned on first
unless the user configured the allocator.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..planner.errors import InvalidArgumentError, PlanMismatchError, VramplanError
from ..planner.schema import Plan, RunReport, StageReport
from .adapters import pipeline_adapter
from .adapters.base import LoadFailure
from .apply import apply_plan
from .memory import MemoryTracker, unit_label

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class RunResult:
    frames: Any
    report: RunReport


def load_pipeline(plan: Plan, allow_download: bool = False, dtype: str | None = None):
    """The plan's pipeline from a local path or the local Hugging Face cache (its pipeline adapter loads it)."""
    from ..profiles import model_catalogue

    name = plan.model_name
    if not name:
        raise VramplanError("the plan names no model; pass pipe= (a pipeline you built)")
    entry = model_catalogue().get(name.lower())
    adapter = pipeline_adapter(plan.pipeline or (entry or {}).get("pipeline"))
    dtype = dtype or next((c.shape.dtype for c in plan.components if c.shape), "fp16")
    try:
        return adapter.load(entry["hf_id"] if entry else name, _DTYPES[dtype], not allow_download, entry)
    except LoadFailure as err:
        raise VramplanError(_missing_message(err.source, err.what, err.cause)) from err


def _missing_message(source: str, cls_name: str, err: Exception) -> str:
    where = "the local folder" if Path(source).exists() else "the local Hugging Face cache"
    missing = []
    if not Path(source).exists():
        try:
            import json

            from huggingface_hub import try_to_load_from_cache

            index = try_to_load_from_cache(source, "model_index.json")
            if isinstance(index, str):  # a pipeline repo: check every component's config
                parts = [k for k, v in json.loads(Path(index).read_text()).items() if isinstance(v, list) and v[0]]
                wanted = [f"{part}/config.json" for part in parts if part not in ("scheduler", "tokenizer")]
            else:
                wanted = ["model_index.json"] if "Pipeline" in cls_name else ["config.json"]
            missing = [f for f in wanted if not isinstance(try_to_load_from_cache(source, f), str)]
        except ImportError:  # pragma: no cover - diffusers depends on huggingface_hub
            pass
    files = f" Missing: {', '.join(missing)}." if missing else ""
    return (
        f"cannot load {cls_name} {source!r} from {where} ({type(err).__name__}: {err}).{files} Download the weights "
        f"once (`huggingface-cli download {source}`), pass allow_download=True, a local path, or pipe=<your pipeline>."
    )


def run(plan: Plan, pipe=None, *, allow_download: bool = False, progress: bool = True, **call_kwargs) -> RunResult:
    """Run ``pipe`` (or the plan's pipeline, loaded locally) under ``plan``; frames and a RunReport."""
    pipe = pipe if pipe is not None else load_pipeline(plan, allow_download)
    kind = type(pipe).__name__
    adapter = pipeline_adapter(kind)
    stages = adapter.stages
    call_kwargs = _call_arguments(plan, call_kwargs, adapter)
    cuda = pipe.device.type == "cuda" or (pipe.device.type == "cpu" and torch.cuda.is_available())
    notes: list[str] = []
    allocator = _configure_allocator(notes) if cuda else None
    device = torch.device("cuda" if cuda else pipe.device)
    progress_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**progress_config, "disable": not progress})

    timings = {stage: [0.0, 0] for stage, _, _ in stages}
    step_times: list[float] = []
    original_devices = {name: m.device for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    started = time.perf_counter()
    with ExitStack() as stack:
        for comp in plan.components:
            if comp.shape is not None:
                handle = apply_plan(getattr(pipe, comp.component), comp)
                stack.callback(handle.remove)
        hooks = _residency(pipe, plan, device, stack, notes)
        for stage, component, method in stages:
            _time_stage(pipe, stage, component, method, timings, hooks, device, stack)
        tracker = None if cuda else stack.enter_context(MemoryTracker())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step_start = [time.perf_counter()]

        user_callback = call_kwargs.get("callback_on_step_end")

        def on_step(pipe_, i, t, kwargs):
            _sync(device)
            now = time.perf_counter()
            step_times.append(now - step_start[0])
            result = user_callback(pipe_, i, t, kwargs) if user_callback else kwargs
            step_start[0] = time.perf_counter()
            return result

        call_kwargs["callback_on_step_end"] = on_step
        output = pipe(**call_kwargs)
        _sync(device)
        for hook in hooks.values():
            hook.offload()
    for name, dev in original_devices.items():
        getattr(pipe, name).to(dev)
    pipe._progress_bar_config = progress_config
    total = time.perf_counter() - started

    report = RunReport(
        device=str(device),
        pipeline=kind,
        plan_gpu=plan.target.gpu if plan.target else None,
        allocator_setting=allocator,
        total_seconds=round(total, 4),
        stages=[
            StageReport(stage=s, seconds=round(t, 4), calls=n,
                        peak_bytes=tracker.units[s].peak_bytes if tracker and s in tracker.units else None)
            for s, (t, n) in timings.items()
        ],
        step_seconds=[round(t, 4) for t in step_times],
        notes=notes,
    )
    if plan.prediction is not None:
        report.predicted_peak_bytes = plan.prediction.peak_bytes
        report.predicted_activation_bytes = plan.prediction.activation_peak_bytes
        report.predicted_latency_s = plan.prediction.latency_s
    if cuda:
        report.peak_allocated_bytes = torch.cuda.max_memory_allocated()
        report.peak_reserved_bytes = torch.cuda.max_memory_reserved()
        report.nvml_used_bytes = _nvml_used()
    else:
        report.tracker_peak_bytes = tracker.peak_bytes
        report.notes.append("CPU run: memory measured by the tracker (tensors made during the run, weights excluded)")
    frames = output.frames if hasattr(output, "frames") else output[0]
    return RunResult(frames=frames, report=report)


def _call_arguments(plan: Plan, kwargs: dict, adapter) -> dict:
    """Fill the call from the plan (the pipeline adapter says which arguments it fixes); refuse a call
    asking for another size than the plan's, or a step count below 1."""
    kwargs = dict(kwargs)
    for key, value in adapter.call_arguments(plan).items():
        if key in ("height", "width", "num_frames") and key in kwargs and kwargs[key] != value:
            raise PlanMismatchError(
                f"the plan is for {plan.frames} frames at {plan.height}x{plan.width}, but the call asks for "
                f"{key}={kwargs[key]}. Make a plan for that size (vramplan.plan_for)."
            )
        kwargs.setdefault(key, value)
    if plan.target is not None:
        kwargs.setdefault("num_inference_steps", plan.target.steps)
    steps = kwargs.get("num_inference_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InvalidArgumentError(f"num_inference_steps={steps!r}: a run needs at least one denoising step")
    return kwargs


def _configure_allocator(notes: list[str]) -> str:
    configured = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")
    if configured:
        notes.append(f"allocator configured by the user: {configured}")
        return configured
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    notes.append("turned on the caching allocator's expandable segments (the plan's assumption)")
    return "expandable_segments:True"


def _residency(pipe, plan: Plan, device, stack: ExitStack, notes: list[str]) -> dict:
    """Resident components go to ``device``; the others get offload hooks. Returns the hooks."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    hooks = {}
    for comp in plan.components:
        model = getattr(pipe, comp.component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        if comp.resident or device.type != "cuda":
            model.to(device)
            continue
        model.to("cpu")
        _, hook = cpu_offload_with_hook(model, execution_device=device)
        hooks[comp.component] = hook
        stack.callback(remove_hook_from_module, model, recurse=True)
    if hooks:
        notes.append(f"moved to the GPU only for their stages: {', '.join(hooks)}")
    return hooks


def _time_stage(pipe, stage: str, component: str, method: str, timings, hooks, device, stack: ExitStack) -> None:
    """Wrap a stage's entry point: offload the other non-resident components, label, time."""
    model = getattr(pipe, component)
    inner = getattr(model, method)
    saved = model.__dict__.get(method)

    def entry(*args, **kwargs):
        for name, hook in hooks.items():
            if name != component:
                hook.offload()
        _sync(device)
        t0 = time.perf_counter()
        with unit_label(stage):
            out = inner(*args, **kwargs)
        _sync(device)
        timings[stage][0] += time.perf_counter() - t0
        timings[stage][1] += 1
        return out

    setattr(model, method, entry)
    stack.callback(_restore, model, method, saved)


def _restore(model, method: str, saved) -> None:
    if saved is None:
        delattr(model, method)
    else:
        setattr(model, method, saved)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _nvml_used() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            index = torch.cuda.current_device()
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML is optional
        return None


def save_video(frames, path: str | Path, fps: int = 7) -> Path:
    """Write frames (PIL images, arrays or a [T, C, H, W] / [T, H, W, C] tensor) as a GIF or MP4."""
    import imageio.v3 as iio
    import numpy as np

    path = Path(path)
    if isinstance(frames, list | tuple) and frames and isinstance(frames[0], list | tuple):
        frames = frames[0]  # a batch of videos: the first
    if isinstance(frames, torch.Tensor):
        video = frames[0] if frames.dim() == 5 else frames
        if video.shape[1] in (1, 3):
            video = video.permute(0, 2, 3, 1)
        arrays = list((video.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
    else:
        arrays = []
        for f in frames:
            a = np.asarray(f)
            arrays.append(a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255).round().astype(np.uint8))
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, arrays, duration=1000 / fps, loop=0)
    else:
        try:
            iio.imwrite(path, arrays, fps=fps)
        except Exception as err:  # noqa: BLE001 - imageio raises various errors without a video backend
            raise VramplanError(f"writing {path.suffix} needs a video backend (pip install imageio-ffmpeg): {err}") from err
    return path
