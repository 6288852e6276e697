"""Profiling a pipeline's stages under their alternative component plans (the torch part of
:mod:`vramplan.planner.alternatives`).

A pipeline lists per stage other plans its model can run under (``stage_alternatives``: SVD's and
AnimateDiff's decode along rows, ``vae_rows``); each is profiled here on the stage's meta component at the
stage's shape, under the adapter of that plan name, and kept beside the stage (``PipelineProfile.alternatives``)
with everything else the stage holds unchanged, so the planner can take either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..planner.schema import PipelineProfile, StageProfile

# Rows slice counts an alternative is planned with, at most: rows segments are priced slice by slice, so
# every larger k costs planning time, and the SD/SVD decoders' rows floors are reached by k = 64 at
# 576x1024 (bench/bench_vae_rows.py).
ALTERNATIVE_MAX_K = 64


def alternative_stages(adapter, components: dict[str, torch.nn.Module], stages: list[StageProfile], kernel: str,
                       name: str, progress: Callable[[str], None] | None = None,
                       max_k: int | None = None) -> list[StageProfile]:
    """Each sliced stage of ``stages`` profiled under every alternative plan ``adapter`` lists for it (rows
    slice counts up to ``max_k`` and :data:`ALTERNATIVE_MAX_K`)."""
    from .profiler import DEFAULT_MAX_K, profile

    limit = min(max_k or DEFAULT_MAX_K, ALTERNATIVE_MAX_K)

    out = []
    for stage in stages:
        for plan_name in adapter.stage_alternatives.get(stage.stage, ()):
            if stage.profile is None:
                continue
            if progress is not None:
                progress(f"{stage.stage}: {stage.component} under {plan_name}")
            with adapter.stage_dtype(components, stage.stage, stage.profile.shape.dtype):
                prof = profile(components[stage.component], stage.profile.shape, kernel, name=name,
                               max_k=max_k or DEFAULT_MAX_K, component=plan_name)
            units = [u.model_copy(update={"scratch": {k: v for k, v in u.scratch.items() if k <= limit}})
                     if u.axis == "rows" else u for u in prof.units]
            prof = prof.model_copy(update={"units": units})
            out.append(stage.model_copy(update={"plan_component": plan_name, "profile": prof}))
    return out


def with_alternatives(prof: PipelineProfile, progress: Callable[[str], None] | None = None) -> PipelineProfile:
    """``prof`` with its stages' alternatives profiled anew on meta components built from its model's
    configs (every stage and component as given): how the shipped profiles gained theirs."""
    from ..planner.pipelines import pipeline_source
    from .adapters.base import pipeline_adapter

    source = pipeline_source(prof.model_name)
    adapter = pipeline_adapter(prof.pipeline)
    components = adapter.meta_components(source.configs, prof.dtype)
    alternatives = alternative_stages(adapter, components, prof.stages, prof.attention_kernel, source.name, progress)
    return prof.model_copy(update={"alternatives": alternatives})


def splice_shipped(models: list[str], progress: Callable[[str], None] | None = None) -> list:
    """Give the shipped pipeline profiles of ``models`` their stages' alternatives, profiled at HEAD; every
    stage and component stays as shipped (the files are re-read and re-written field for field)."""
    from importlib import resources
    from pathlib import Path

    from ..planner.plan import SHIPPED_DIR

    folder = Path(str(resources.files("vramplan.profiles").joinpath(SHIPPED_DIR)))
    written = []
    for model in models:
        for path in sorted(folder.glob(f"{model}-[0-9]*.pipeline.json")):
            prof = PipelineProfile.load(path)
            if progress is not None:
                progress(f"{path.name}: profiling its stages' alternatives")
            written.append(with_alternatives(prof.model_copy(update={"alternatives": []}), progress).save(path))
    return written
