"""One video job: from a JSON job description to a video file and its RunReport. Shared by Serve and batch.

A job is ``{"workload": name, "image": path | data URL | base64, "prompt": text, "seed": 0, ...}``;
any other key in ``options`` is passed to the pipeline call (``run`` refuses sizes that differ from
the plan's). Imports torch lazily: the Serve ingress and the batch driver never load it.
"""

from __future__ import annotations

import base64
import importlib
import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..planner.capacity import FleetError
from ..planner.errors import VramplanError
from ..planner.gpus import find_gpu
from ..planner.schema import Plan

DEFAULT_FACTORY = "vramplan.runtime.runner:load_pipeline"
GPU_ENV = "VRAMPLAN_GPU"  # declare the GPU name instead of asking NVML (CPU test clusters, exotic drivers)


class GpuMismatchError(FleetError):
    """A replica started on a GPU other than the one its plan was made for."""


class JobError(FleetError, ValueError):
    """A job description that cannot be run."""


def local_gpu(declared: str | None = None) -> str:
    """The name of the GPU this process sees: ``declared``, $VRAMPLAN_GPU, or NVML's first visible device."""
    name = declared or os.environ.get(GPU_ENV)
    if name:
        return name
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            raw = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # noqa: BLE001 - no library, no driver, no device: all mean "no GPU here"
        raise GpuMismatchError(
            f"this replica sees no NVIDIA GPU (NVML: {err}). Schedule it on a GPU node, or declare the GPU "
            f"with {GPU_ENV}=<name> on clusters without NVML."
        ) from err
    return raw.decode() if isinstance(raw, bytes) else raw


def check_gpu(plan: Plan, declared: str | None = None) -> str:
    """Refuse to serve ``plan`` on a GPU other than its target: its memory guarantee would not hold."""
    if plan.target is None:
        raise GpuMismatchError("the plan has no target GPU; make it with plan_for or vramplan fleet")
    found = local_gpu(declared)
    try:
        here = find_gpu(found).name
    except VramplanError:
        here = found
    wanted = find_gpu(plan.target.gpu).name
    if here != wanted:
        raise GpuMismatchError(
            f"this replica runs on {found!r} but its plan ({plan.describe()}) was made for {wanted}: its memory "
            f"and latency predictions do not hold here. Check the deployment's accelerator label, or re-plan."
        )
    return here


def import_factory(path: str) -> Callable[[Plan], Any]:
    """``"module:function"`` -> the function (pipeline factories are named, never pickled code)."""
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise FleetError(f"pipeline factory {path!r} cannot be imported ({err}); give 'module:function'") from err


def _image(value: str):
    from PIL import Image

    if value.startswith("data:"):
        value = value.split(",", 1)[1]
    path = Path(value)
    try:
        if len(value) < 4096 and path.exists():
            return Image.open(path).convert("RGB")
        return Image.open(io.BytesIO(base64.b64decode(value, validate=True))).convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL and base64 raise many kinds
        raise JobError(f"'image' is neither a readable image file nor base64 image data ({err})") from err


def safe_id(job_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", job_id) or job_id.startswith("."):
        raise JobError(f"job id {job_id!r}: use 1-128 letters, digits, '.', '_' or '-'")
    return job_id


def call_arguments(plan: Plan, job: dict) -> dict:
    """Pipeline call arguments of a job: conditioning, seed, steps, options."""
    import torch

    kwargs = dict(job.get("options") or {})
    if not isinstance(kwargs, dict):
        raise JobError("'options' must be an object of pipeline call arguments")
    if plan.pipeline == "AnimateDiffPipeline":
        if "prompt" not in job and "prompt_embeds" not in kwargs:
            raise JobError("an AnimateDiff job needs 'prompt'")
        if "prompt" in job:
            kwargs["prompt"] = job["prompt"]
        if job.get("negative_prompt"):
            kwargs["negative_prompt"] = job["negative_prompt"]
    else:
        if "image" not in job:
            raise JobError("a Stable Video Diffusion job needs 'image' (a path, data URL or base64 PNG/JPEG)")
        kwargs["image"] = _image(job["image"])
    if job.get("steps") is not None:
        kwargs["num_inference_steps"] = int(job["steps"])
    kwargs["generator"] = torch.Generator().manual_seed(int(job.get("seed", 0)))
    return kwargs


def execute(plan: Plan, pipe, job: dict, out_dir: str | Path,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Run one job under ``plan`` on ``pipe``; write ``<out_dir>/<id>.<format>``. Returns the video path and
    the RunReport (as JSON data). Raises on a bad job; the caller records the error per job."""
    from ..runtime.runner import run, save_video

    job_id = safe_id(str(job.get("id", "")))
    kwargs = call_arguments(plan, job)
    steps = kwargs.get("num_inference_steps", plan.target.steps if plan.target else 25)
    if progress is not None:
        progress(0, steps)

        def on_step(pipe_, i, t, tensors):
            progress(i + 1, steps)
            return tensors

        kwargs["callback_on_step_end"] = on_step
    result = run(plan, pipe=pipe, progress=False, **kwargs)
    fmt = str(job.get("format", "gif")).lower()
    if fmt not in ("gif", "mp4"):
        raise JobError(f"format {fmt!r}: choose gif or mp4")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = save_video(result.frames, out / f"{job_id}.{fmt}", fps=int(job.get("fps", 7)))
    return {"video_path": str(path.resolve()), "report": result.report.model_dump(mode="json")}
