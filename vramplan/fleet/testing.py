"""Tiny stand-ins for tests and demos of the fleet machinery on CPU-only Ray clusters.

``tiny_pipeline`` is a pipeline factory (``"vramplan.fleet.testing:tiny_pipeline"``) building the tiny
random-weight pipelines of :mod:`vramplan.runtime.tiny`; ``tiny_fleet`` swaps every job's plan in a fleet
plan for a plan of that tiny pipeline, keeping the GPU target and predicted peak (so the packing and the
GPU checks behave as for the real plan) while a job takes a second on a CPU.
"""

from __future__ import annotations

from ..planner.capacity import FleetPlan


def tiny_pipeline(plan):
    import torch

    from ..runtime.tiny import tiny_animatediff_pipeline, tiny_svd_pipeline

    torch.set_num_threads(1)
    return tiny_animatediff_pipeline() if plan.pipeline == "AnimateDiffPipeline" else tiny_svd_pipeline()


def tiny_fleet(fleet: FleetPlan, size: int = 32, frames: int = 5, k: int = 2) -> FleetPlan:
    from ..runtime import uniform_pipeline_plan
    from ..runtime.tiny import tiny_svd_pipeline

    pipe = tiny_svd_pipeline()
    tiny = uniform_pipeline_plan(pipe, k, size, size, frames)
    data = fleet.model_copy(deep=True)
    for alloc in data.gpus:
        for packing in alloc.packings:
            for job in packing.jobs:
                job.plan = tiny.model_copy(update={"target": job.plan.target, "prediction": job.plan.prediction})
    return FleetPlan.model_validate(data.model_dump()).check()
