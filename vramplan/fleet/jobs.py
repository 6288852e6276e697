"""One video job: from a JSON job description to a video file and its RunReport. Shared by Serve and batch.

A job is ``{"workload": name, "image_bytes": checked image | "image": data URL | base64 | (batch files
only) a path, "prompt": text, "seed": 0, ...}``, its fields checked by :mod:`.requests`; ``options`` go to
the pipeline call. Imports torch lazily: the Serve ingress and the batch driver never load it.
"""

from __future__ import annotations

import importlib
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


def job_image(job: dict, limits=None):
    """The job's conditioning image as RGB: checked bytes from the HTTP front (``image_bytes``), or for
    batch files (the operator's own) base64 / a data URL / a regular file, under the same limits."""
    from .inputs import InputError, Limits, decode_base64_image, load_image, read_regular_file

    limits = limits or Limits()
    data = job.get("image_bytes")
    try:
        if data is None:
            value = job.get("image")
            if not isinstance(value, str) or not value:
                raise InputError("image", "give the image as base64 data, a data URL or (batch files) a file path")
            if not value.startswith("data:") and len(value) < 4096 and os.path.lexists(value):
                data = read_regular_file(value, limits)
            else:
                data = decode_base64_image(value, limits)
        return load_image(data, limits)
    except InputError as err:
        raise JobError(str(err)) from None


def safe_id(job_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", job_id) or job_id.startswith("."):
        raise JobError(f"job id {job_id!r}: use 1-128 letters, digits, '.', '_' or '-'")
    return job_id


class JobTimeoutError(JobError):
    """A job that ran past its time limit (stopped at the next step)."""


def call_arguments(plan: Plan, job: dict) -> dict:
    """Pipeline call arguments of a job: conditioning, seed, steps, options (checked at the door by
    :mod:`.requests`; checked again here for batch files and direct callers)."""
    import torch

    from ..planner.pipelines import pipeline_spec

    if not isinstance(job.get("options") or {}, dict):
        raise JobError("'options' must be an object of pipeline call arguments")
    kwargs = dict(job.get("options") or {})
    if pipeline_spec(plan.pipeline).conditioning == "prompt":
        if not job.get("prompt"):
            raise JobError("an AnimateDiff job needs 'prompt'")
        kwargs["prompt"] = job["prompt"]
        if job.get("negative_prompt"):
            kwargs["negative_prompt"] = job["negative_prompt"]
    else:
        kwargs["image"] = job_image(job)
    if job.get("steps") is not None:
        kwargs["num_inference_steps"] = job["steps"]
    kwargs["generator"] = torch.Generator().manual_seed(job.get("seed", 0))
    return kwargs


def execute(plan: Plan, pipe, job: dict, out_dir: str | Path,
            progress: Callable[[int, int], None] | None = None,
            stop: Callable[[], bool] | None = None) -> dict:
    """Run one job under ``plan`` on ``pipe``; write ``<out_dir>/<id>.<format>``. Returns the video path and
    the RunReport (as JSON data). Raises on a bad job; the caller records the error per job. ``stop()``
    is asked after every step: True ends the job with :class:`JobTimeoutError`."""
    from ..runtime.runner import run, save_video

    job_id = safe_id(str(job.get("id", "")))
    fmt = str(job.get("format", "gif")).lower()
    if fmt not in ("gif", "mp4"):
        raise JobError(f"format {fmt!r}: choose gif or mp4")
    fps = job.get("fps", 7)
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 60:
        raise JobError(f"fps {fps!r}: give a whole number of frames per second, 1..60")
    kwargs = call_arguments(plan, job)
    steps = kwargs.get("num_inference_steps", plan.target.steps if plan.target else 25)

    def on_step(pipe_, i, t, tensors):
        if progress is not None:
            progress(i + 1, steps)
        if stop is not None and stop():
            raise JobTimeoutError(f"stopped after step {i + 1} of {steps}: the job ran past its time limit")
        return tensors

    if progress is not None:
        progress(0, steps)
    if progress is not None or stop is not None:
        kwargs["callback_on_step_end"] = on_step
    result = run(plan, pipe=pipe, progress=False, **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = save_video(result.frames, out / f"{job_id}.{fmt}", fps=fps)
    return {"video_path": str(path.resolve()), "report": result.report.model_dump(mode="json")}
