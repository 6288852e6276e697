"""Capacity planning for a fleet: which GPUs can run a job, how fast, and how many are needed.

For every GPU profile the whole pipeline is planned (fastest plan within its memory); a GPU that
cannot fit the job even at maximum slicing is reported with the smallest peak it would need.
Throughput follows from the predicted latency, so it is as (un)calibrated as the GPU profiles.
No torch: this runs on a laptop from the shipped profiles.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from .errors import InfeasibleError
from .gpus import all_gpus, find_gpu
from .pipeline import plan_pipeline


class FleetRow(BaseModel):
    gpu: str
    fits: bool
    peak_bytes: int = Field(description="predicted peak of the fastest plan, or the smallest reachable if it does not fit")
    seconds_per_video: float | None = None
    videos_per_hour: float | None = None
    gpus_needed: int | None = Field(default=None, description="to sustain the requested rate")
    calibrated: bool = False
    note: str = ""


def capacity(
    model: str = "svd",
    height: int = 576,
    width: int = 1024,
    frames: int | None = None,
    steps: int = 25,
    guidance: bool = True,
    dtype: str = "fp16",
    videos_per_hour: float | None = None,
    gpus: list[str] | None = None,
) -> list[FleetRow]:
    """One row per GPU, fastest first; infeasible GPUs last."""
    from ..api import find_pipeline_profile, sample_shape_for, video_frames
    from .pipelines import check_number

    check_number("videos_per_hour", videos_per_hour, positive=True, allow_none=True)
    check_number("steps", steps, integer=True, minimum=1)

    sample_shape_for(model, height, width, frames, guidance, dtype)  # refuses what the model cannot take
    rows = []
    for gpu in [find_gpu(g) for g in gpus] if gpus else list(all_gpus()):
        if dtype == "bf16" and not gpu.bf16:
            rows.append(FleetRow(gpu=gpu.name, fits=False, peak_bytes=0, note="no bf16 on this GPU"))
            continue
        kernel = gpu.attention_kernel if dtype != "fp32" else "efficient"
        profile = find_pipeline_profile(model, height, width, video_frames(model, frames), guidance, dtype, kernel)
        try:
            plan = plan_pipeline(profile, gpu, steps=steps)
        except InfeasibleError as err:
            rows.append(FleetRow(gpu=gpu.name, fits=False, peak_bytes=getattr(err, "min_peak_bytes", 0),
                                 note=f"needs {getattr(err, 'stage', '?')} stage memory beyond this GPU"))
            continue
        seconds = plan.prediction.latency_s
        per_hour = 3600 / seconds
        rows.append(FleetRow(
            gpu=gpu.name, fits=True, peak_bytes=plan.prediction.peak_bytes, seconds_per_video=round(seconds, 2),
            videos_per_hour=round(per_hour, 2), calibrated=gpu.calibrated,
            gpus_needed=math.ceil(videos_per_hour / per_hour) if videos_per_hour else None,
        ))
    return sorted(rows, key=lambda r: (not r.fits, r.seconds_per_video or 0.0))


def rederive_job_peaks(fleet) -> None:
    """Before a fleet plan's packings are checked: every job's embedded plan must agree with itself and
    with its model's profile (:func:`.integrity.check_plan` recomputes its prediction), and each job's
    stated peak must be its plan's. A fleet plan edited to lower its jobs' peaks is refused here
    (:class:`.capacity.FleetPlanError`, naming the job and the field)."""
    from .capacity import FleetPlanError
    from .errors import PlanIntegrityError
    from .integrity import check_plan

    for alloc in fleet.gpus:
        for p, packing in enumerate(alloc.packings):
            for j, job in enumerate(packing.jobs):
                where = f"gpus[{alloc.gpu}].packings[{p}].jobs[{j}] ({job.workload})"
                try:
                    check_plan(job.plan, source=f"fleet plan job {where}")
                except PlanIntegrityError as err:
                    raise FleetPlanError(str(err).replace("make a new plan (vramplan plan)",
                                                          "re-plan the fleet (vramplan fleet)")) from None
                pred = job.plan.prediction
                if pred is not None and job.peak_bytes != pred.peak_bytes:
                    raise FleetPlanError(
                        f"fleet plan job {where}: field 'peak_bytes' is {job.peak_bytes}, but its plan's peak is "
                        f"{pred.peak_bytes}; re-plan the fleet (vramplan fleet)"
                    )
