"""Attach a plan to a model, reversibly, and the helpers that make plans by hand.

``apply_plan`` replaces the model's entry method (``forward``; ``decode`` for VAEs: the adapter
says) with the planned executor, as an instance attribute like diffusers' hooks and accelerate's,
and ``remove()`` puts back exactly what was there. No
weight is copied or moved.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import torch

from ..planner.errors import InvalidPlanError, PlanMismatchError
from ..planner.schema import ComponentPlan, Group, ModelRef, Plan, SampleShape
from . import adapters  # noqa: F401  (registers the adapters)
from .adapters.base import adapter_for
from .executor import Segment, execute
from .program import Op, Program, UnitSpec

log = logging.getLogger(__name__)

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_MISSING = object()


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; vramplan plans fp32, fp16 and bf16") from None


def config_hash(config: dict) -> str:
    """sha256 of a diffusers config, ignoring bookkeeping keys (``_name_or_path``, versions)."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers or diffusers
    clean = {k: v for k, v in items.items() if not k.startswith("_") and k != "transformers_version"}
    text = json.dumps(clean, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(model: torch.nn.Module, name: str | None = None) -> ModelRef:
    return ModelRef(class_name=type(model).__name__, config_hash=config_hash(model.config), name=name)


def list_units(model: torch.nn.Module) -> list[UnitSpec]:
    """The model's units in execution order (``.name``, ``.axis``)."""
    ops, _ = adapter_for(model).ops(model)
    return [op.spec for op in ops]


def sample_shape(sample: torch.Tensor) -> SampleShape:
    """The plan shape of a ``[batch, frames, channels, height, width]`` latent sample."""
    b, t, _, h, w = sample.shape
    return SampleShape(batch=b, frames=t, latent_height=h, latent_width=w, dtype=dtype_name(sample.dtype))


def uniform_plan(model: torch.nn.Module, k: int, shape: SampleShape, *, group: bool = True) -> Plan:
    """A one-component plan that slices every sliceable unit ``k`` ways; with ``group``, maximal runs
    of one axis are grouped (a unit that needs statistics over its whole input starts a new group)."""
    return Plan(components=[uniform_component(model, k, shape, group=group)])


def uniform_component(model: torch.nn.Module, k: int, shape: SampleShape, *, group: bool = True) -> ComponentPlan:
    """The component plan of :func:`uniform_plan`."""
    units = list_units(model)
    slices = {u.name: k for u in units if u.axis is not None and k > 1}
    groups = []
    if group and k > 1:
        run: list[UnitSpec] = []
        for unit in [*units, None]:
            if run and (unit is None or unit.axis != run[-1].axis or unit.needs_input_stats):
                if len(run) > 1:
                    groups.append(Group(units=[u.name for u in run], axis=run[0].axis, k=k))
                run = []
            if unit is not None and unit.axis is not None:
                run.append(unit)
    component = getattr(adapter_for(model), "component", "unet")
    return ComponentPlan(component=component, model=fingerprint(model), shape=shape, slices=slices, groups=groups)


@dataclass(eq=False)
class PlanHandle:
    """A plan attached to a model. ``remove()`` (or leaving the ``with`` block) restores it."""

    model: torch.nn.Module
    plan: ComponentPlan
    ops: list[Op]
    result: str
    segments: list[Segment]
    unsliced: dict[str, str] = field(default_factory=dict)
    method: str = "forward"
    _saved_forward: object = _MISSING
    active: bool = True

    def __enter__(self) -> PlanHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        if not self.active:
            return
        if self._saved_forward is _MISSING:
            delattr(self.model, self.method)
        else:
            setattr(self.model, self.method, self._saved_forward)
        self.active = False

    def __call__(self, *args, **kwargs):
        hook = getattr(self.model, "_hf_hook", None)
        if hook is not None and self.method != "forward":  # as diffusers' apply_forward_hook does
            hook.pre_forward(self.model)
        adapter = adapter_for(self.model)
        binding = adapter.bind(self.model, *args, **kwargs)
        _check_shape(self.plan, binding.shape)
        program = Program(
            ops=self.ops,
            env=binding.env,
            layouts=binding.layouts,
            result=self.result,
            finish=binding.finish,
            globals=binding.globals,
        )
        return execute(program, self.segments)


def apply_plan(model: torch.nn.Module, plan: Plan | ComponentPlan) -> PlanHandle:
    """Make ``model`` run its part of ``plan`` until the returned handle's ``remove()``.

    A whole-pipeline plan is searched for the component made for this model (class and config).
    """
    adapter = adapter_for(model)
    plan = component_for(model, plan)
    ops, result = adapter.ops(model)
    segments, unsliced = build_segments(ops, plan)
    for unit, why in unsliced.items():
        log.warning("%s runs unsliced: %s", unit, why)
    handle = PlanHandle(model, plan, ops, result, segments, unsliced)
    handle.method = getattr(adapter, "method", "forward")
    handle._saved_forward = model.__dict__.get(handle.method, _MISSING)
    setattr(model, handle.method, handle)
    return handle


def component_for(model: torch.nn.Module, plan: Plan | ComponentPlan) -> ComponentPlan:
    """The component of ``plan`` made for ``model``, or a PlanMismatchError saying what it was made for."""
    if isinstance(plan, ComponentPlan):
        _check_model(model, plan)
        return plan
    actual = fingerprint(model)
    for comp in plan.components:
        if (comp.model.class_name, comp.model.config_hash) == (actual.class_name, actual.config_hash):
            return comp
    made_for = "; ".join(f"{c.component}: {c.model.describe()} with {c.shape.describe()}" for c in plan.components)
    raise PlanMismatchError(
        f"this plan was made for {made_for}, but the model is {actual.describe()}. "
        f"Make a plan for this model (vramplan.plan_for or vramplan.runtime.uniform_plan)."
    )


def build_segments(ops: list[Op], plan: ComponentPlan) -> tuple[list[Segment], dict[str, str]]:
    """Plan groups and ungrouped units as executor segments; validates the plan against the ops."""
    index = {op.name: i for i, op in enumerate(ops)}
    unknown = [u for u in list(plan.slices) + [u for g in plan.groups for u in g.units] if u not in index]
    if unknown:
        raise InvalidPlanError(
            f"the plan names units this model does not have: {', '.join(unknown[:5])}"
            + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        )
    unsliced: dict[str, str] = {}
    group_at: dict[int, Group] = {}
    for group in plan.groups:
        positions = [index[u] for u in group.units]
        if positions != list(range(positions[0], positions[0] + len(positions))):
            raise InvalidPlanError(f"group starting at {group.units[0]} is not a run of consecutive units")
        for pos in positions:
            spec = ops[pos].spec
            if spec.axis != group.axis:
                raise InvalidPlanError(
                    f"unit {spec.name} slices along {spec.axis or 'no axis'}, but its group is along {group.axis}"
                )
            if spec.needs_input_stats and pos != positions[0]:
                raise InvalidPlanError(
                    f"unit {spec.name} needs statistics over its whole input, so it must start its group"
                )
        group_at[positions[0]] = group

    segments: list[Segment] = []
    i = 0
    while i < len(ops):
        if i in group_at:
            group = group_at[i]
            segments.append(Segment(ops[i : i + len(group.units)], group.axis, group.k))
            i += len(group.units)
            continue
        op = ops[i]
        k = plan.k(op.name)
        if k > 1 and op.spec.axis is None:
            unsliced[op.name] = "no exact slicing axis"
            k = 1
        segments.append(Segment([op], op.spec.axis, k))
        i += 1
    return segments, unsliced


def _check_model(model: torch.nn.Module, plan: ComponentPlan) -> None:
    actual = fingerprint(model)
    if (actual.class_name, actual.config_hash) != (plan.model.class_name, plan.model.config_hash):
        raise PlanMismatchError(
            f"this plan was made for {plan.model.describe()} with {plan.shape.describe()}, "
            f"but the model is {actual.describe()}. Make a plan for this model "
            f"(vramplan.plan_for or vramplan.runtime.uniform_plan)."
        )


def _check_shape(plan: ComponentPlan, shape: dict) -> None:
    got = SampleShape(
        batch=shape["batch"],
        frames=shape["frames"],
        latent_height=shape["latent_height"],
        latent_width=shape["latent_width"],
        dtype=dtype_name(shape["dtype"]),
    )
    if got != plan.shape:
        raise PlanMismatchError(
            f"this plan was made for {plan.shape.describe()}, but the call has {got.describe()}. "
            f"Make a plan for this shape."
        )


def uniform_pipeline_plan(pipe, k: int, height: int, width: int, num_frames: int, guidance: bool = True) -> Plan:
    """A plan for a video pipeline (SVD, AnimateDiff) slicing its UNet and VAE decoder ``k`` ways,
    grouped, at this size: the UNet sees ``num_frames`` latents per video (x2 with CFG), the decoder
    all frames of one video at once."""
    scale = pipe.vae_scale_factor
    dtype = dtype_name(pipe.unet.dtype)
    size = dict(frames=num_frames, latent_height=height // scale, latent_width=width // scale, dtype=dtype)
    return Plan(
        pipeline=type(pipe).__name__, height=height, width=width, frames=num_frames,
        components=[
            uniform_component(pipe.unet, k, SampleShape(batch=2 if guidance else 1, **size)),
            uniform_component(pipe.vae, k, SampleShape(batch=1, **size)),
        ],
    )
