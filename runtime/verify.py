"""Execute a plan on meta tensors of the full-size models and compare with its prediction."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..planner.allocator import replay
from ..planner.errors import PlanMismatchError, VramplanError
from ..planner.schema import ComponentPlan, Plan
from .adapters.base import adapter_for, measure_whole_stages, pipeline_adapter
from .apply import apply_plan, fingerprint
from .fake import attention_kernel
from .memory import MemoryTracker


@dataclass
class VerifyReport:
    component: str  # for a stage that runs whole: "<stage> (<component>)"
    measured_activation_bytes: int
    predicted_activation_bytes: int | None
    measured_needed_bytes: int  # the measured allocation sequence replayed through the allocator model
    peak_label: str | None
    seconds: float
    # Host memory: the buffers of host-placed values the call allocated at most at once (the tracker)
    # plus the streamed blocks' host weights; predicted: the stage's ``host_bytes``.
    measured_host_bytes: int = 0
    predicted_host_bytes: int | None = None
    unsliced: dict[str, str] | None = None  # units the plan slices that run whole, and why

    @property
    def error(self) -> float | None:
        """Relative error of the predicted activation peak (+ = over-predicted)."""
        if not self.predicted_activation_bytes:
            return None
        return self.predicted_activation_bytes / self.measured_activation_bytes - 1

    @property
    def host_error(self) -> float | None:
        """Relative error of the predicted host memory (+ = over-predicted); None when nothing to compare."""
        if self.predicted_host_bytes is None or (not self.predicted_host_bytes and not self.measured_host_bytes):
            return None
        if not self.measured_host_bytes:
            return float("inf")
        return self.predicted_host_bytes / self.measured_host_bytes - 1


def verify(plan: Plan | ComponentPlan, model: torch.nn.Module | None = None) -> VerifyReport:
    """Verify the plan's first sliced component (or the one made for ``model``)."""
    return verify_all(plan, {} if model is None else {None: model})[0]


def verify_all(plan: Plan | ComponentPlan, models: dict | None = None,
               progress: Callable[[str], None] | None = None) -> list[VerifyReport]:
    """Run every sliced component of ``plan`` on meta tensors; one report per component.

    ``models`` maps component names to models to use instead of building them from the catalogue
    (``{None: model}``: the component made for that model). ``progress`` gets a line as each
    component starts (a full-size model takes seconds to tens of seconds each: the user sees which).
    """
    say = progress or (lambda message: None)
    if isinstance(plan, ComponentPlan):
        plan = Plan(components=[plan])
    models = dict(models or {})
    reports = []
    if plan.pipeline:
        pipeline_adapter(plan.pipeline).check_plan(plan)
    sliced = [c for c in plan.components if c.shape is not None]
    whole = not models and plan.pipeline and plan.model_name
    total = len(sliced) + (1 if whole else 0)
    for i, comp in enumerate(sliced, 1):
        model = models.get(comp.component)
        if model is None and None in models:
            if fingerprint(models[None]).config_hash != comp.model.config_hash:
                continue
            model = models[None]
        say(f"[{i}/{total}] {comp.component}: {'building the meta model and ' if model is None else ''}"
            f"executing the plan ...")
        if model is None:
            model = _build(plan, comp)
        reports.append(_run(plan, comp, model))
    if whole:
        say(f"[{total}/{total}] stages that run whole (encoders, decoder): measuring ...")
        reports += _whole_stages(plan)
    return reports


def missing_components(plan: Plan) -> list[str]:
    """Components the plan's pipeline slices but the plan does not (they would run whole, unplanned)."""
    if not plan.pipeline:
        return []
    return pipeline_adapter(plan.pipeline).missing_components(plan)


def failures(plan: Plan, reports: list[VerifyReport], tolerance: float) -> list[str]:
    """What makes a verify fail: a missing sliced component, or a prediction off by more than ``tolerance``."""
    out = [f"{c}: missing from the plan, so it would run unsliced and unplanned" for c in missing_components(plan)]
    for report in reports:
        for unit, why in (report.unsliced or {}).items():
            out.append(f"{report.component}: the plan slices {unit}, which runs whole ({why})")
        if report.error is not None and abs(report.error) > tolerance:
            out.append(f"{report.component}: prediction off by {report.error * 100:+.2f} % "
                       f"(tolerance {tolerance * 100:.2f} %)")
        if report.host_error is not None and abs(report.host_error) > tolerance:
            out.append(f"{report.component}: host memory prediction off by {report.host_error * 100:+.2f} % "
                       f"(tolerance {tolerance * 100:.2f} %)")
    return out


def integrity(plan: Plan) -> tuple[list[str], bool]:
    """What in ``plan`` disagrees with itself or with its model (:mod:`vramplan.planner.integrity`),
    checked against its pipeline profile: shipped, cached or profiled now on meta tensors (cached).
    Also says whether a profile was found (False: the plan was checked against itself only)."""
    from ..planner.integrity import problems

    found = problems(plan, find_profile=False)
    if found:
        return found, False
    profile = _profile_of(plan)
    return problems(plan, profile), profile is not None


def _profile_of(plan: Plan):
    """The plan's pipeline profile, found or made (None for a plan without a pipeline header)."""
    from ..planner.integrity import shipped_profile

    found = shipped_profile(plan)
    if found is not None or not (plan.pipeline and plan.model_name and plan.height and plan.target):
        return found
    from ..api import find_pipeline_profile
    from ..planner.integrity import profile_key

    key = profile_key(plan)
    if key is None:
        return None
    try:
        return find_pipeline_profile(plan.model_name, plan.height, plan.width, plan.frames, *key,
                                     plan.target.attention_kernel)
    except VramplanError:  # a model the catalogue does not know (the trained demo model): no profile
        return None


def _whole_stages(plan: Plan) -> list[VerifyReport]:
    """Re-measure the stages that run unsliced (encoders) on meta tensors of the pipeline's components."""
    from ..planner.pipelines import pipeline_source

    adapter = pipeline_adapter(plan.pipeline)
    started = time.perf_counter()
    dtype = next(c.shape.dtype for c in plan.components if c.shape is not None)
    components = adapter.meta_components(pipeline_source(plan.model_name).configs, dtype)
    kernel = plan.target.attention_kernel if plan.target else "flash"
    measured = measure_whole_stages(adapter, components, plan.height, plan.width, plan.frames, dtype, kernel)
    reports = []
    for stage in plan.stages:
        if stage.stage in measured:
            reports.append(VerifyReport(
                component=f"{stage.stage} ({stage.component})",
                measured_activation_bytes=measured[stage.stage][0],
                predicted_activation_bytes=stage.activation_bytes,
                measured_needed_bytes=measured[stage.stage][0],
                peak_label=None,
                seconds=time.perf_counter() - started,
            ))
    return reports


def _build(plan: Plan, comp: ComponentPlan) -> torch.nn.Module:
    from ..planner.pipelines import pipeline_source
    from .models import meta_from_config, meta_unet

    name = plan.model_name or comp.model.name
    if not name:
        raise PlanMismatchError("the plan names no model to build; pass the model to verify()")
    if plan.pipeline:
        configs = pipeline_source(name).configs
        if comp.module_name not in configs:  # a stage's own plan (vae_encoder) runs on its attribute (vae)
            raise PlanMismatchError(f"{name} has no component {comp.module_name!r} (it has {', '.join(configs)})")
        model = meta_from_config(configs[comp.module_name], comp.shape.dtype)
    else:
        model = meta_unet(name, comp.shape.dtype)
    actual = fingerprint(model)
    if actual.config_hash != comp.model.config_hash:
        raise PlanMismatchError(f"the plan's {comp.component} was made for {comp.model.describe()}, "
                                f"but {name} builds {actual.describe()}")
    return model


def _run(plan: Plan, comp: ComponentPlan, model: torch.nn.Module) -> VerifyReport:
    started = time.perf_counter()
    adapter = adapter_for(model, comp.component)
    args = adapter.example_inputs(model, comp.shape, device="meta")
    kernel = plan.target.attention_kernel if plan.target else "flash"
    expandable = plan.target is None or plan.target.allocator == "expandable_segments"
    with apply_plan(model, comp) as handle, attention_kernel(kernel), MemoryTracker(record_events=True) as tracker:
        with torch.no_grad():
            getattr(model, adapter.method)(*args)
        streamed = _streamed_host_bytes(handle)
        unsliced = dict(handle.unsliced)
    predicted = predicted_host = None
    for stage in plan.stages:
        if stage.component == comp.component and stage.peak_unit is not None:
            predicted, predicted_host = stage.activation_bytes, stage.host_bytes
    if predicted is None and plan.prediction is not None and len(plan.components) == 1:
        predicted, predicted_host = plan.prediction.activation_peak_bytes, plan.prediction.host_bytes
    return VerifyReport(
        component=comp.component,
        measured_activation_bytes=tracker.peak_bytes,
        predicted_activation_bytes=predicted,
        measured_needed_bytes=replay(tracker.events, expandable).needed_peak,
        peak_label=tracker.peak_label,
        seconds=time.perf_counter() - started,
        measured_host_bytes=tracker.host_peak_bytes + streamed,
        predicted_host_bytes=predicted_host,
        unsliced=unsliced,
    )


def _streamed_host_bytes(handle) -> int:
    """Bytes of the streamed blocks' host weights (each storage once): host memory for the whole run."""
    streamer = handle.streamer
    if streamer is None:
        return 0
    storages = {}
    for block in streamer.blocks.values():
        for w in block.weights:
            storage = w.host.untyped_storage()
            storages[id(storage)] = storage.nbytes()
    return sum(storages.values())
