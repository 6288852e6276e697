"""``run(plan)``: execute a plan on a real diffusers pipeline and measure it.

The pipeline is loaded from a local path or the local Hugging Face cache (never downloaded unless
asked), or passed in. Each sliced component gets its part of the plan; components the plan does
not keep resident are given accelerate offload hooks (moved to the GPU for their stage, off
before another stage starts); the pipeline runs as usual, with its progress bar; everything is
restored afterwards, also when the pipeline raises: devices, the progress-bar config, the hooks
vramplan attached (plans, timers, offload: through the hook registry, so the user's own hooks
stay), and on CUDA the caching allocator's expandable segments, turned on for the run unless the
user configured the allocator.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..planner.errors import InvalidArgumentError, PlanMismatchError, VramplanError
from ..planner.schema import Plan, RunReport, StageReport
from .adapters import pipeline_adapter
from .adapters.base import LoadFailure
from .apply import HOST_EQUALS_DEVICE, PlanHandle, apply_plan
from .executor import watching_pinning
from .hooks import Hook, register_hook, reset_state
from .memory import MemoryTracker, unit_label
from .rehash import apply_rehash, check_rehash_call, denoiser_attribute

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
        f"once (`huggingface-cli download {source}`), pass allow_download=True (`--allow-download` on the command line), a local path, or pipe=<your pipeline>."
    )


def run(plan: Plan, pipe=None, *, allow_download: bool = False, progress: bool = True,
        memory_snapshot: str | Path | None = None, **call_kwargs) -> RunResult:
    """Run ``pipe`` (or the plan's pipeline, loaded locally) under ``plan``; frames and a RunReport.

    ``memory_snapshot``: on CUDA, record the caching allocator's history during the pipeline call and
    write PyTorch's snapshot there (for https://pytorch.org/memory_viz); refused without CUDA."""
    if memory_snapshot is not None:
        check_snapshot(memory_snapshot)
    planned = pipeline_adapter(plan.pipeline) if plan.pipeline else None
    if planned is not None and hasattr(planned, "check_call"):  # before any weight is loaded
        planned.check_call(plan, call_kwargs)
    pipe = pipe if pipe is not None else load_pipeline(plan, allow_download)
    kind = type(pipe).__name__
    adapter = pipeline_adapter(kind)
    if planned is not None and hasattr(planned, "check_pipeline"):  # a variant of the class (Wan 2.2's experts)
        planned.check_pipeline(pipe, plan)
        adapter = planned
    said = planned.prompt_notes(pipe, call_kwargs) if planned is not None and hasattr(planned, "prompt_notes") else []
    stages = adapter.stages
    call_kwargs = _call_arguments(plan, call_kwargs, adapter)
    cuda = pipe.device.type == "cuda" or (pipe.device.type == "cpu" and torch.cuda.is_available())
    notes: list[str] = list(said)
    device = torch.device("cuda" if cuda else pipe.device)
    components = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    rehash = None
    if plan.rehash is not None:
        check_rehash_call(pipe, plan.rehash, call_kwargs)

    timings = {stage: [0.0, 0] for stage, _, _ in stages}
    step_times: list[float] = []
    started = time.perf_counter()
    with ExitStack() as stack:  # undone in reverse order, also when the pipeline raises
        allocator = stack.enter_context(allocator_setting(notes)) if cuda else None
        _keep_pipeline_state(pipe, stack)
        pipe.set_progress_bar_config(**{**pipe._progress_bar_config, "disable": not progress})
        handles: dict[str, PlanHandle] = {}
        for comp in plan.components:
            # the denoiser's (a UNet, or a DiT: Wan's transformer) slices it too (if it has a shape)
            if plan.rehash is not None and comp.component == denoiser_attribute(pipe):
                rehash = apply_rehash(pipe, plan)
                stack.callback(rehash.remove)
                handles[comp.component] = rehash
                handles.update(rehash.experts)  # Wan 2.2's transformer_2: its part of the schedule, its slicing
            elif comp.component in handles:
                continue
            elif comp.shape is not None:  # a stage's own plan (vae_encoder) runs on its attribute (vae)
                handles[comp.component] = apply_plan(getattr(pipe, comp.module_name), comp)
                stack.callback(handles[comp.component].remove)
        _placement_notes(plan, device, notes)
        hooks = _residency(pipe, plan, device, stack, notes, offload=device.type == "cuda", handles=handles)
        for stage, component, method in stages:
            if getattr(pipe, component, None) is None:  # a component this checkpoint lacks: the stage does not run
                continue
            timer = _StageTimer(stage, component, timings, hooks, device)
            stack.callback(register_hook(getattr(pipe, component), timer, f"vramplan.timer.{stage}", method=method).remove)
        tracker = None if cuda else stack.enter_context(MemoryTracker())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        reset_state(*components)  # a new pipeline call: hooks start without per-call state
        stack.callback(reset_state, *components)
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
        if memory_snapshot is not None:
            stack.enter_context(recording_memory(memory_snapshot, notes))
        pinning_failures = stack.enter_context(watching_pinning())  # host buffers that fell back to pageable
        output = pipe(**call_kwargs)
        _sync(device)
        for hook in hooks.values():
            hook.offload()
        pageable = False
        for name, handle in handles.items():
            streamer = handle._streamer
            if streamer is not None and not streamer.pinned:
                pageable = True
                notes.append(f"{name}: pinned host memory could not be allocated ({streamer.fallback_error}); "
                             "streamed weights used pageable memory (slower transfers)")
        if pinning_failures:
            pageable = True
            notes.append(f"pinned host memory could not be allocated ({pinning_failures[0]}); host-placed values "
                         f"used pageable memory (slower transfers)")
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
    if rehash is not None:
        report.key_steps, report.reused_steps = rehash.key_steps, rehash.reused_steps
        report.unet_call_seconds = [round(r.seconds, 4) for r in rehash.all_records]
    if plan.prediction is not None:
        report.predicted_peak_bytes = plan.prediction.peak_bytes
        report.predicted_activation_bytes = plan.prediction.activation_peak_bytes
        report.predicted_latency_s = plan.prediction.latency_s
    if pageable:
        report.predicted_pageable_latency_s, note = pageable_latency(plan)
        report.notes.append(note)
    if cuda:
        report.peak_allocated_bytes = torch.cuda.max_memory_allocated()
        report.peak_reserved_bytes = torch.cuda.max_memory_reserved()
        report.nvml_used_bytes = _nvml_used()
    else:
        report.tracker_peak_bytes = tracker.peak_bytes
        report.notes.append("CPU run: memory measured by the tracker (tensors made during the run, weights excluded)")
    frames = output.frames if hasattr(output, "frames") else output[0]
    return RunResult(frames=frames, report=report)


def pageable_latency(plan: Plan) -> tuple[float | None, str]:
    """The plan's predicted latency re-priced at the pageable host-link rate (pinned host memory could
    not be allocated), and a note saying so; (None, why) when it cannot be re-priced.

    The pricing is the planner's (:func:`~vramplan.planner.pipeline.repriced_latency`), with the stage
    profiles of the plan's pipeline (shipped or cached: never profiled here)."""
    if plan.prediction is None or plan.target is None or not plan.stages:
        return None, "pinned memory failed: the pageable re-pricing is unavailable (the plan has no per-stage prediction)"
    was = plan.prediction.latency_s
    profile, why = _stage_profiles(plan)
    if profile is None:
        return None, (f"pinned memory failed: the pageable re-pricing is unavailable ({why}); the plan predicted "
                      f"{_secs(was)} s pinned")
    from ..planner.gpus import find_gpu
    from ..planner.pipeline import repriced_latency

    try:
        seconds = repriced_latency(plan, profile, find_gpu(plan.target.gpu), pinned=False)
    except ValueError as err:
        return None, (f"pinned memory failed: the pageable re-pricing is unavailable ({err}); the plan predicted "
                      f"{_secs(was)} s pinned")
    return seconds, f"predicted {_secs(seconds)} s at the pageable rate (was {_secs(was)} s pinned)"


def _secs(x: float) -> str:
    return f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def _stage_profiles(plan: Plan):
    """The plan's pipeline profile, shipped or in the profile cache (never profiled here: that takes
    minutes), or (None, why)."""
    from ..planner.pipelines import pipeline_source, pipeline_spec
    from ..planner.plan import pipeline_profile_name, shipped_pipeline_profile
    from ..planner.schema import PipelineProfile
    from .profiler import PROFILER_VERSION, cache_dir

    if not (plan.pipeline and plan.model_name and plan.height and plan.width and plan.frames):
        return None, "the plan names no pipeline, model or size"
    try:
        spec = pipeline_spec(plan.pipeline)
        denoiser = plan.component(next(c for s, c, _ in spec.stages if s == "denoise"))
        guidance = denoiser.shape.batch == spec.guidance_batch if denoiser.shape else True
        dtype = denoiser.shape.dtype if denoiser.shape else "fp16"
        args = (plan.height, plan.width, plan.frames, guidance, dtype, plan.target.attention_kernel)
        shipped = shipped_pipeline_profile(plan.model_name, *args)
        if shipped is not None:
            return shipped, ""
        source = pipeline_source(plan.model_name)
        name = pipeline_profile_name(source.key, *args)
        pattern = name.replace(".pipeline.json", f"-k*-v{PROFILER_VERSION}.pipeline.json")
        for path in sorted(cache_dir().glob(pattern)):
            try:
                found = PipelineProfile.load(path)
            except (VramplanError, OSError):
                continue
            if (found.pipeline, found.height, found.width, found.frames, found.guidance, found.dtype,
                    found.attention_kernel) == (source.pipeline, *args):
                return found, ""
    except (VramplanError, KeyError, StopIteration) as err:
        return None, f"its pipeline profile cannot be found: {err}"
    return None, f"no shipped or cached profile of {plan.model_name} at {plan.frames} x {plan.height}x{plan.width}"


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


def _get_allocator_settings() -> str:
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    return getter() if getter is not None else ""


def _set_allocator_settings(settings: str) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    (setter or torch.cuda.memory._set_allocator_settings)(settings)


@contextmanager
def allocator_setting(notes: list[str]) -> Iterator[str]:
    """Expandable segments (the plan's assumption) for the run unless the user configured the
    allocator; the process-wide setting is switched back afterwards, also when the run fails."""
    configured = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")
    if configured:
        notes.append(f"allocator configured by the user: {configured}")
        yield configured
        return
    before = re.search(r"expandable_segments:(\w+)", _get_allocator_settings() or "")
    wanted = "expandable_segments:True"
    _set_allocator_settings(wanted)
    notes.append("turned on the caching allocator's expandable segments (the plan's assumption) for this run")
    try:
        yield wanted
    finally:
        _set_allocator_settings(f"expandable_segments:{before.group(1) if before else 'False'}")


def _keep_pipeline_state(pipe, stack: ExitStack) -> None:
    """Put back the components' devices and the progress-bar config when the stack closes."""
    devices = {name: m.device for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    config = dict(getattr(pipe, "_progress_bar_config", {}))

    def restore() -> None:
        pipe._progress_bar_config = config
        for name, dev in devices.items():
            model = getattr(pipe, name)
            if getattr(model, "_hf_hook", None) is None or model.device != torch.device("meta"):
                model.to(dev)

    stack.callback(restore)
    pipe._progress_bar_config = dict(config)


def _residency(pipe, plan: Plan, device, stack: ExitStack, notes: list[str], offload: bool = True,
               handles: dict[str, PlanHandle] | None = None) -> dict:
    """Resident components go to ``device``; the others get accelerate offload hooks (``offload``:
    on CUDA), removed afterwards. A component that already carries an accelerate hook (the user's
    ``enable_model_cpu_offload``) keeps it and is left to it. Streamed blocks stay in (pinned) host
    memory either way: only the other weights move. Returns the hooks added."""
    from accelerate import cpu_offload_with_hook

    hooks = {}
    for comp in plan.components:
        model = getattr(pipe, comp.component, None) if comp.attribute is None else None
        if not isinstance(model, torch.nn.Module):  # a stage's own plan moves with its attribute's model
            continue
        streamers = [h.streamer for c in plan.components if c.module_name == comp.component
                     and (h := (handles or {}).get(c.component)) is not None and h.streamer is not None]
        streamer = _Streamers(streamers) if streamers else None
        if getattr(model, "_hf_hook", None) is not None:
            notes.append(f"{comp.component} keeps the accelerate hook it came with (its device is up to that hook)")
            if streamer is not None:
                notes.append(f"{comp.component}: that hook moves the streamed blocks with the whole model; each call "
                             f"puts them back in host memory first (slower; remove the hook to stream as planned)")
            continue
        if streamer is not None:
            skip = {id(w.tensor) for b in streamer.blocks.values() for w in b.weights}
            if comp.resident or not offload:
                move_weights(model, device, skip)
            else:
                move_weights(model, torch.device("cpu"), skip)
                hook = _partial_offload(model, device, skip)
                hooks[comp.component] = hook
                stack.callback(hook.remove)
            streamer.offload(compute=device)  # pinned host copies for a CUDA run
            continue
        if comp.resident or not offload:
            model.to(device)
            continue
        model.to("cpu")
        _, hook = cpu_offload_with_hook(model, execution_device=device)
        hooks[comp.component] = hook
        stack.callback(hook.remove)  # this hook only: the user's hooks (on submodules too) stay
    if hooks:
        notes.append(f"moved to the GPU only for their stages: {', '.join(hooks)}")
    return hooks


class _Streamers:
    """The streamers of every plan on one model (its decode's and its encode's) as one, for residency."""

    def __init__(self, streamers: list) -> None:
        self.streamers = streamers
        self.blocks = {f"{i}:{name}": b for i, s in enumerate(streamers) for name, b in s.blocks.items()}

    def offload(self, compute=None) -> None:
        for s in self.streamers:
            s.offload(compute=compute)


def move_weights(model: torch.nn.Module, device, skip: set[int]) -> None:
    """Every parameter and buffer of ``model`` but those in ``skip`` (ids) to ``device``, in place
    (``.data``: the objects stay the model's)."""
    device = torch.device(device)
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in skip and not _on(t, device):
            t.data = t.data.to(device)


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` is on ``device`` (``cuda`` matches every CUDA index)."""
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def _partial_offload(model: torch.nn.Module, device, skip: set[int]):
    """accelerate's ``cpu_offload_with_hook`` for a model with streamed blocks: the hook moves every
    weight but the streamed ones (``skip``) to ``device`` before the model runs and back to the CPU on
    ``offload()``; the streamed blocks stay in host memory for the streamer."""
    from accelerate.hooks import CpuOffload, UserCpuOffloadHook, add_hook_to_module
    from accelerate.utils import send_to_device

    class PartialCpuOffload(CpuOffload):
        def init_hook(self, module):
            move_weights(module, torch.device("cpu"), skip)
            return module

        def pre_forward(self, module, *args, **kwargs):
            moved = [t for t in [*module.parameters(), *module.buffers()] if id(t) not in skip]
            if all(_on(t, torch.device(self.execution_device)) for t in moved):
                return args, kwargs
            move_weights(module, self.execution_device, skip)
            return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

    hook = PartialCpuOffload(execution_device=device)
    add_hook_to_module(model, hook, append=True)
    return UserCpuOffloadHook(model, hook)


def _placement_notes(plan: Plan, device, notes: list[str]) -> None:
    """What host placement and streaming mean on this device (said in the report)."""
    placed = [c.component for c in plan.components if c.host or c.streamed]
    if placed and device.type != "cuda":
        notes.append(f"{', '.join(placed)}: {HOST_EQUALS_DEVICE}; streamed weights are copied in per segment as on "
                     f"a GPU")
    for comp in plan.components:
        if comp.streamed:
            notes.append(f"{comp.component}: {len(comp.streamed)} blocks streamed from host memory "
                         f"({', '.join(comp.streamed[:4])}{', ...' if len(comp.streamed) > 4 else ''})")
        if comp.host:
            notes.append(f"{comp.component}: {len(comp.host)} values placed in host memory between segments")


def check_snapshot(path: str | Path) -> Path:
    """``--memory-snapshot``: CUDA only (the allocator snapshot records CUDA allocations); checked before
    any loading."""
    if not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"--memory-snapshot {path}: PyTorch's allocator snapshot records CUDA allocations, and this machine has "
            f"no CUDA device. Run on a GPU, or use the run report's tracker peak (CPU runs measure memory so)."
        )
    folder = Path(path).expanduser().parent
    if not folder.is_dir():
        raise InvalidArgumentError(f"--memory-snapshot {path}: the folder {folder} does not exist")
    return Path(path)


@contextmanager
def recording_memory(path: str | Path, notes: list[str]) -> Iterator[None]:
    """Record the CUDA caching allocator's history while inside; write the snapshot to ``path`` at the
    end (also when the call raises: the snapshot then shows the failure)."""
    record = torch.cuda.memory._record_memory_history
    record(max_entries=1_000_000)
    try:
        yield
    finally:
        try:
            torch.cuda.memory._dump_snapshot(str(path))
            notes.append(f"wrote the CUDA allocator snapshot to {path} (open it at https://pytorch.org/memory_viz)")
        finally:
            record(enabled=None)


class _StageTimer(Hook):
    """Around a stage's entry point: offload the other non-resident components, label, time."""

    def __init__(self, stage: str, component: str, timings: dict, hooks: dict, device) -> None:
        self.stage, self.component, self.timings, self.hooks, self.device = stage, component, timings, hooks, device

    def wrap(self, module, call_next, args, kwargs):
        for name, hook in self.hooks.items():
            if name != self.component:
                hook.offload()
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            with unit_label(self.stage):
                return call_next(*args, **kwargs)
        finally:
            _sync(self.device)
            self.timings[self.stage][0] += time.perf_counter() - t0
            self.timings[self.stage][1] += 1


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
