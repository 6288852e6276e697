"""Attach a plan to a model, reversibly, and the helpers that make plans by hand.

``apply_plan`` attaches the planned executor as the hook ``vramplan.plan`` (:mod:`.hooks`) at the
innermost place of the model's entry method (``forward``; ``decode`` for VAEs: the adapter says):
wrappers of others (accelerate's offload, diffusers' hooks, the runner's timers) keep running
around it, and ``remove()`` relinks exactly what was there, in any order. Hooks on submodules the
executor does not call (containers such as ``down_blocks.0``) are found by tracing one call on a
meta copy, then run around the segments of their units (offloading, casting) or refused by name.
No weight is copied or moved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..planner.errors import InvalidPlanError, PlanConflictError, PlanMismatchError
from ..planner.schema import ComponentPlan, Group, ModelRef, Plan, SampleShape
from . import adapters  # noqa: F401  (registers the adapters)
from .adapters.base import adapter_for
from .executor import Segment, execute, unit_by_unit
from .hooks import _ATTR as _REGISTRY_ATTR
from .hooks import (
    PLAN_HOOK,
    Bridge,
    Hook,
    _Link,
    bridge_for,
    get_hook,
    hook_signature,
    hooked_modules,
    register_hook,
    remove_hook,
    stateful_hooks,
)
from .program import Op, Program, UnitSpec
from .streaming import WeightStreamer, block_of, owning_block, streamable_blocks

log = logging.getLogger(__name__)

HOST_EQUALS_DEVICE = (
    "host placement requested but no CUDA device: host == device (values are still staged and accounted as on host)"
)
STREAM_EQUALS_DEVICE = (
    "weight streaming requested but no CUDA device: host == device (weights are still copied in per segment and "
    "accounted as streamed)"
)

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


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


def list_units(model: torch.nn.Module, component: str | None = None) -> list[UnitSpec]:
    """The model's units in execution order (``.name``, ``.axis``); ``component="vae_encoder"``: a
    VAE's encode rather than its decode."""
    ops, _ = adapter_for(model, component).ops(model)
    return [op.spec for op in ops]


def sample_shape(sample: torch.Tensor, model: torch.nn.Module | None = None) -> SampleShape:
    """The plan shape of a ``[batch, frames, channels, height, width]`` latent sample, or of the layout
    ``model``'s adapter names (``sample_layout = "bcthw"``: a DiT's ``[batch, channels, frames, h, w]``)."""
    if model is not None and getattr(adapter_for(model), "sample_layout", "btchw") == "bcthw":
        sample = sample.transpose(1, 2)
    b, t, _, h, w = sample.shape
    return SampleShape(batch=b, frames=t, latent_height=h, latent_width=w, dtype=dtype_name(sample.dtype))


def uniform_plan(model: torch.nn.Module, k: int, shape: SampleShape, *, group: bool = True,
                 component: str | None = None) -> Plan:
    """A one-component plan that slices every sliceable unit ``k`` ways; with ``group``, maximal runs
    of one axis are grouped (a unit that needs statistics over its whole input starts a new group)."""
    return Plan(components=[uniform_component(model, k, shape, group=group, component=component)])


def uniform_component(model: torch.nn.Module, k: int, shape: SampleShape, *, group: bool = True,
                      component: str | None = None) -> ComponentPlan:
    """The component plan of :func:`uniform_plan`."""
    units = list_units(model, component)
    slices = {u.name: k for u in units if u.axis is not None and k > 1}
    groups = []
    if group and k > 1:
        run: list[UnitSpec] = []
        for unit in [*units, None]:
            if run and (unit is None or unit.axis != run[-1].axis or unit.needs_input_stats
                        or set(unit.whole_inputs) & {u.name for u in run}):
                if len(run) > 1:
                    groups.append(Group(units=[u.name for u in run], axis=run[0].axis, k=k))
                run = []
            if unit is not None and unit.axis is not None:
                run.append(unit)
    component = getattr(adapter_for(model, component), "component", "unet")
    return ComponentPlan(component=component, model=fingerprint(model), shape=shape, slices=slices, groups=groups)


@dataclass(eq=False)
class PlanHandle(Hook, _Link):
    """A plan attached to a model as the hook ``vramplan.plan`` (:mod:`vramplan.runtime.hooks`).
    ``remove()`` (or leaving the ``with`` block) detaches it; other hooks stay as they are."""

    model: torch.nn.Module
    plan: ComponentPlan
    ops: list[Op]
    result: str
    segments: list[Segment]
    unsliced: dict[str, str] = field(default_factory=dict)
    method: str = "forward"
    active: bool = True
    hook_name: str = PLAN_HOOK
    _bridges: dict[str, Bridge] = field(default_factory=dict)
    _hooked: tuple = ()
    _calls: tuple[frozenset[str], frozenset[str]] | None = None
    _streamer: WeightStreamer | None = None
    _said_host: bool = False
    _said_stream: bool = False
    _named: list | None = None  # the model's (name, module) pairs, listed once: the plan's ops hold their modules

    def __enter__(self) -> PlanHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        try:
            if get_hook(self.model, self.hook_name) is self:
                remove_hook(self.model, self.hook_name)
        finally:
            self.active = False
            self.restore_weights()

    def on_remove(self, module: torch.nn.Module) -> None:
        self.restore_weights()

    __repr__ = _Link.__repr__

    # -- streamed weights -------------------------------------------------------------------------
    @property
    def streamer(self) -> WeightStreamer | None:
        """The plan's weight streamer (None without streamed blocks); made on first use, which checks
        the blocks (a meta trace of which units read which weights) and moves their weights to host."""
        if self._streamer is None and self.plan.streamed:
            gathered = {owning_block(op.name, self.plan.streamed) for seg in self.segments for op in seg.ops
                        if op.gathers}  # the streamed block each gathering unit lies in
            self._streamer = make_streamer(self.model, self.plan, self.method, gathered)
        return self._streamer

    def restore_weights(self) -> None:
        """Every streamed weight back on the device it came from (a no-op without streaming)."""
        if self._streamer is not None:
            streamer, self._streamer = self._streamer, None
            streamer.restore()

    def placement(self, program: Program) -> dict[str, Any]:
        """The executor's host-placement arguments for a call of ``program`` (``host``, ``host_device``):
        pinned CPU memory on CUDA; without CUDA host == device (said once)."""
        if not self.plan.host:
            return {}
        device = _device_of(program)
        cuda = device is not None and device.type == "cuda"
        if not cuda and not self._said_host and device is not None and device.type != "meta":  # meta: verify
            self._said_host = True
            log.warning("%s: %s", self.plan.component, HOST_EQUALS_DEVICE)
        return {"host": frozenset(self.plan.host), "host_device": torch.device("cpu") if cuda else None}

    # -- hooks of modules the plan does not call --------------------------------------------------
    def check_hooks(self) -> dict[str, Bridge]:
        """Bridges for the hooks on submodules whose forward the plan bypasses (traced once, when a
        hooked submodule first appears); a PlanConflictError for a hook that cannot be bridged, or
        for a stateful diffusers hook (a cache) on a module the plan calls once per slice."""
        if self._named is None:
            self._named = list(self.model.named_modules())
        hooked = hooked_modules(self.model, self._named)
        signature = tuple((name, hook_signature(m)) for name, m in hooked.items())
        if signature == self._hooked:
            return self._bridges
        bridges = {}
        if hooked:
            planned, unplanned = self._traced_calls()
            for name, module in hooked.items():
                if name in planned:  # its __call__ runs under the plan: its hooks fire, once per slice
                    stateful, k = stateful_hooks(module), self._slices(name)
                    if stateful and k > 1:
                        raise PlanConflictError(
                            f"{name} carries {', '.join(stateful)}, which keeps state across calls, but the plan "
                            f"calls {name} once per slice ({k} slices). Remove the hook, or leave that unit unsliced."
                        )
                    continue
                if name not in unplanned:
                    continue  # not called without the plan either
                why = f"the plan for {type(self.model).__name__} runs {_owner_text(name, self.ops)}"
                bridge = bridge_for(name, module, why)
                if bridge.describe:
                    bridges[name] = bridge
        self._hooked, self._bridges = signature, bridges
        return bridges

    def _slices(self, name: str) -> int:
        """How many times per call the plan runs the unit holding module ``name`` (1 outside units)."""
        return max((seg.k for seg in self.segments if any(_owns(name, op.name) for op in seg.ops)), default=1)

    def _traced_calls(self) -> tuple[frozenset[str], frozenset[str]]:
        if self._calls is None:
            try:
                self._calls = traced_calls(self.model, self.plan.shape or config_shape(self.model), self.method,
                                           self.plan.component)
            except Exception as err:  # noqa: BLE001 - a model that cannot be copied or traced on meta
                log.warning("could not trace which modules the plan calls (%s: %s); deciding by module paths "
                            "(containers of units are bypassed)", type(err).__name__, err)
                names = {name for name, _ in self.model.named_modules() if name}
                containers = {n for n in names if any(op.name.startswith(n + ".") for op in self.ops)}
                self._calls = frozenset(names - containers), frozenset(names)
        return self._calls

    # -- the call ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def bridged(self, segments: list[Segment]) -> Iterator[Callable | None]:
        """Run the hooks of modules the plan bypasses around ``segments`` (:meth:`check_hooks`):
        yields the ``around_segment`` for :func:`execute` (None when there is nothing to bridge).
        Every bridge entered is exited, also when a segment raises."""
        starts, ends, whole = _bridge_schedule(self.check_hooks(), segments)
        index = {id(seg): i for i, seg in enumerate(segments)}
        entered: list[Bridge] = []

        @contextlib.contextmanager
        def around(seg: Segment):
            i = index[id(seg)]
            for bridge in starts.get(i, ()):
                bridge.enter()
                entered.append(bridge)
            yield
            for bridge in reversed(ends.get(i, ())):
                entered.remove(bridge)
                bridge.exit()

        streamer = self.streamer
        with contextlib.ExitStack() as stack:
            try:
                for bridge in whole:
                    bridge.enter()
                    entered.append(bridge)
                if streamer is None:
                    yield around if starts else None
                    return
                device = _compute_device(self.model, streamer)
                if device.type not in ("cuda", "meta") and not self._said_stream:  # meta: verify, on purpose
                    self._said_stream = True
                    log.warning("%s: %s", self.plan.component, STREAM_EQUALS_DEVICE)
                streaming = stack.enter_context(streamer.call(segments, device))

                @contextlib.contextmanager
                def both(seg: Segment):
                    with around(seg), streaming(seg):  # bridges first (their onload), then the streamed blocks
                        yield

                yield both
            finally:
                for bridge in reversed(entered):
                    bridge.exit()

    def wrap(self, module, call_next, args, kwargs):
        model = self.model
        hook = getattr(model, "_hf_hook", None)
        if hook is not None and self.method != "forward":  # as diffusers' apply_forward_hook does
            hook.pre_forward(model)
        checkpoint = torch.is_grad_enabled() and _checkpointing(model)
        with self.bridged(self.segments) as around:
            binding = adapter_for(model, self.plan.component).bind(model, *args, **kwargs)
            _check_shape(self.plan, binding.shape)
            program = Program(
                ops=self.ops,
                env=binding.env,
                layouts=binding.layouts,
                result=self.result,
                finish=binding.finish,
                globals=binding.globals,
            )
            return execute(program, self.segments, around_segment=around, checkpoint=checkpoint,
                           **self.placement(program))


def apply_plan(model: torch.nn.Module, plan: Plan | ComponentPlan) -> PlanHandle:
    """Make ``model`` run its part of ``plan`` until the returned handle's ``remove()``.

    A whole-pipeline plan is searched for the component made for this model (class and config).
    The plan is the hook ``vramplan.plan`` at the innermost place of the model's entry method, so
    wrappers installed before it (accelerate's offload) still run, and those installed after it wrap
    it. A second plan on the same model raises PlanConflictError; so does a hook on a submodule the
    plan bypasses that cannot be run around the plan's segments.
    """
    plan = component_for(model, plan)
    adapter = adapter_for(model, plan.component)
    hook_name = _plan_hook(adapter)
    if get_hook(model, hook_name) is not None:
        raise PlanConflictError(
            f"{type(model).__name__} already runs under a plan. Remove the first plan's handle "
            f"(handle.remove(), or leave its `with` block) before applying another."
        )
    ops, result = adapter.ops(model)
    segments, unsliced = build_segments(ops, plan)
    handle = PlanHandle(model, plan, ops, result, segments, unsliced, method=getattr(adapter, "method", "forward"),
                        hook_name=hook_name)
    handle.check_hooks()  # refuse unbridgeable hooks now, before anything is attached
    for unit, why in unsliced.items():
        log.warning("%s runs unsliced: %s", unit, why)
    handle.streamer  # noqa: B018 - checks the streamed blocks and moves their weights to host now
    try:
        register_hook(model, handle, hook_name, method=handle.method, innermost=True)
    except BaseException:
        handle.restore_weights()
        raise
    return handle


def _plan_hook(adapter) -> str:
    """The hook name of a plan: ``vramplan.plan``, or ``vramplan.plan.encode`` for a VAE's encode (a
    VAE may carry an encode plan and a decode plan at once)."""
    method = getattr(adapter, "method", "forward")
    return f"{PLAN_HOOK}.{method}" if method == "encode" else PLAN_HOOK


def make_streamer(model: torch.nn.Module, plan: ComponentPlan, method: str = "forward",
                  gathered: set[str] | frozenset[str] = frozenset()) -> WeightStreamer:
    """The :class:`WeightStreamer` of ``plan.streamed`` on ``model`` (weights moved to host now), after
    checking that each block's weights are read by that block's units only (a meta trace). ``gathered``:
    blocks whose tables their unit gathers rows of (``Op.gathers``), left in host memory."""
    modules = dict(model.named_modules(remove_duplicate=False))
    streamable = streamable_blocks(model, plan.shape or config_shape(model), method, top_level=True)
    if streamable is not None:
        shared = [b for b in plan.streamed if b not in streamable and b in modules]
        if shared:
            raise InvalidPlanError(
                f"the plan streams {', '.join(shared)}, but {'their' if len(shared) > 1 else 'its'} weights are also "
                f"read outside {'those blocks' if len(shared) > 1 else 'that block'} (or it has none): only blocks "
                f"listed in the profile's block_weights can stream ({', '.join(streamable) or 'none here'})"
            )
    streamer = WeightStreamer(model, plan.streamed, gathered)
    streamer.offload()
    return streamer


def _device_of(program: Program) -> torch.device | None:
    """The compute device of a call: where its inputs are."""
    for value in program.env.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _compute_device(model: torch.nn.Module, streamer: WeightStreamer) -> torch.device:
    """Where the model computes: its resident weights' device (streamed ones are on host now)."""
    streamed = {id(w.tensor) for b in streamer.blocks.values() for w in b.weights}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in streamed and t.is_floating_point():
            return t.device
    return next((w.home for b in streamer.blocks.values() for w in b.weights), torch.device("cpu"))


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether gradient checkpointing is on (diffusers sets ``gradient_checkpointing`` on the blocks)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _owns(module_name: str, op_name: str) -> bool:
    """Whether the module at ``module_name`` holds the op (a container of it) or is part of it."""
    return op_name == module_name or op_name.startswith(module_name + ".") or module_name.startswith(op_name + ".")


def _owner_text(name: str, ops: list[Op]) -> str:
    owned = [op.name for op in ops if _owns(name, op.name)]
    if not owned:
        return f"its units without calling {name}"
    more = f" (and {len(owned) - 2} more)" if len(owned) > 2 else ""
    return f"{', '.join(owned[:2])}{more} without calling {name}'s forward"


def _bridge_schedule(bridges: dict[str, Bridge], segments: list[Segment]):
    """Per segment index, the bridges to enter before it and exit after it; bridges owning no op
    are entered around the whole call."""
    starts: dict[int, list[Bridge]] = {}
    ends: dict[int, list[Bridge]] = {}
    whole = []
    for name, bridge in bridges.items():
        where = [i for i, seg in enumerate(segments) if any(_owns(name, op.name) for op in seg.ops)]
        if not where:
            whole.append(bridge)
            continue
        starts.setdefault(where[0], []).append(bridge)
        ends.setdefault(where[-1], []).append(bridge)
    return starts, ends, whole


def config_shape(model: torch.nn.Module) -> SampleShape:
    """A shape valid for ``model`` from its config (``sample_size``, ``num_frames``) and dtype: what a
    trace uses when the plan has no shape (a Step Rehash schedule without slicing)."""
    cfg = model.config
    size = getattr(cfg, "sample_size", None) or 8
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    frames = getattr(cfg, "num_frames", None) or 2
    return SampleShape(batch=1, frames=frames, latent_height=h, latent_width=w, dtype=dtype_name(model.dtype))


def traced_calls(model: torch.nn.Module, shape: SampleShape, method: str = "forward", component: str | None = None):
    """(modules called under a plan, modules called without), by module path, traced once on a copy
    of ``model`` whose weights are meta tensors (no memory, no data, nobody's hooks)."""
    twin = _meta_twin(model, _TORCH_DTYPES[shape.dtype])
    called: set[str] = set()
    handles = [
        m.register_forward_pre_hook(lambda *_, n=name: called.add(n)) for name, m in twin.named_modules() if name
    ]
    adapter = adapter_for(twin, component)
    try:
        args = adapter.example_inputs(twin, shape, device="meta")
        with torch.no_grad():
            try:
                getattr(twin, method)(*args)
                unplanned = frozenset(called)
            except Exception as err:  # noqa: BLE001 - then every module counts as called without a plan
                log.debug("unplanned meta trace failed (%s); assuming every module runs", err)
                unplanned = frozenset(name for name, _ in twin.named_modules() if name)
            called.clear()
            ops, result = adapter.ops(twin)
            binding = adapter.bind(twin, *args)
            program = binding.program(ops, result)
            execute(program, unit_by_unit(ops), first_slice_only=True)
            planned = frozenset(called)
    finally:
        for h in handles:
            h.remove()
    return planned, unplanned


_HOOK_ATTRS = ("forward", "_old_forward", "_hf_hook", "_diffusers_hook", _REGISTRY_ATTR)
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
)


def _meta_twin(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A structural copy of ``model``: same modules and attributes, parameters and buffers as meta
    tensors of ``dtype``, without anybody's hooks. Copies no weight data."""
    import copy

    memo: dict[int, Any] = {}
    cleared = []
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None and id(p) not in memo:
                kind = dtype if p.is_floating_point() else p.dtype
                memo[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=kind, device="meta"), requires_grad=False)
        for b in m._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() else b.dtype, device="meta")
        for attr in _HOOK_DICTS:
            hooks = m.__dict__.get(attr)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
        for attr in (*_HOOK_ATTRS, *[a for a in ("decode", "encode") if a in m.__dict__]):
            if attr in m.__dict__:
                memo[id(m.__dict__[attr])] = None
                cleared.append(attr)
    twin = copy.deepcopy(model, memo)
    for m in twin.modules():
        for attr in set(cleared):
            if attr in m.__dict__ and m.__dict__[attr] is None:
                del m.__dict__[attr]
    return twin


def component_for(model: torch.nn.Module, plan: Plan | ComponentPlan) -> ComponentPlan:
    """The component of ``plan`` made for ``model``, or a PlanMismatchError saying what it was made for."""
    if isinstance(plan, ComponentPlan):
        _check_model(model, plan)
        return plan
    actual = fingerprint(model)
    for comp in plan.components:
        if (comp.model.class_name, comp.model.config_hash) == (actual.class_name, actual.config_hash):
            return comp
    made_for = "; ".join(c.describe() for c in plan.components)
    raise PlanMismatchError(
        f"this plan was made for {made_for}, but the model is {actual.describe()}. "
        f"Make a plan for this model (vramplan.plan_for or vramplan.runtime.uniform_plan)."
    )


def build_segments(ops: list[Op], plan: ComponentPlan) -> tuple[list[Segment], dict[str, str]]:
    """Plan groups and ungrouped units as executor segments; validates the plan against the ops: its
    units, groups, ``recompute`` (exactly the grouped statistics units whose input the group makes),
    ``host`` (values made by one segment and read by another) and ``streamed`` (blocks of the units)."""
    index = {op.name: i for i, op in enumerate(ops)}
    unknown = [u for u in list(plan.slices) + [u for g in plan.groups for u in g.units] if u not in index]
    if unknown:
        raise InvalidPlanError(f"the plan names units this model does not have: {_names(unknown)}")
    unsliced: dict[str, str] = {}
    group_at: dict[int, Group] = {}
    recompute: list[str] = []
    for group in plan.groups:
        positions = [index[u] for u in group.units]
        if positions != list(range(positions[0], positions[0] + len(positions))):
            raise InvalidPlanError(f"group starting at {group.units[0]} is not a run of consecutive units")
        made = set()
        for pos in positions:
            spec = ops[pos].spec
            if spec.axis != group.axis:
                raise InvalidPlanError(
                    f"unit {spec.name} slices along {spec.axis or 'no axis'}, but its group is along {group.axis}"
                )
            inside = sorted(made & set(spec.whole_inputs))
            if inside:
                raise InvalidPlanError(
                    f"unit {spec.name} reads {_names(inside)} whole, so its group may not make it: "
                    f"end the group before {spec.name}"
                )
            if spec.needs_input_stats and ops[pos].inputs and ops[pos].inputs[0] in made:
                recompute.append(spec.name)  # its statistics input is made in the group: a recompute pass
            made.add(ops[pos].output)
        group_at[positions[0]] = group
    _check_recompute(plan, index, recompute)

    segments: list[Segment] = []
    i = 0
    while i < len(ops):
        if i in group_at:
            group = group_at[i]
            segments.append(Segment(ops[i : i + len(group.units)], group.axis, group.k, depth=group.depth))
            i += len(group.units)
            continue
        op = ops[i]
        k = plan.k(op.name)
        if k > 1 and op.spec.axis is None:
            unsliced[op.name] = "no exact slicing axis"
            k = 1
        segments.append(Segment([op], op.spec.axis, k))
        i += 1
    _check_host(plan, ops, segments)
    _check_streamed(plan, ops)
    return segments, unsliced


def _names(names: list[str], most: int = 5) -> str:
    more = f" (and {len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _check_recompute(plan: ComponentPlan, index: dict[str, int], derived: list[str]) -> None:
    listed = list(dict.fromkeys(plan.recompute))
    unknown = [u for u in listed if u not in index]
    if unknown:
        raise InvalidPlanError(f"the plan's recompute names units this model does not have: {_names(unknown)}")
    extra = [u for u in listed if u not in derived]
    if extra:
        raise InvalidPlanError(
            f"the plan's recompute lists {_names(extra)}, but no group makes {'their' if len(extra) > 1 else 'its'} "
            f"statistics input: recompute is for a unit that needs statistics over its input and sits in a group "
            f"after the unit that makes that input"
        )
    missing = [u for u in derived if u not in listed]
    if missing:
        one = len(missing) == 1
        raise InvalidPlanError(
            f"{_names(missing)} {'needs' if one else 'need'} statistics over an input made in {'its' if one else 'their'} "
            f"own group: {'it' if one else 'each'} must start its group, or be listed in the plan's recompute (a "
            f"recompute pass of the units that make that input)"
        )


def _check_host(plan: ComponentPlan, ops: list[Op], segments: list[Segment]) -> None:
    """Host values: made by a unit, not the result, read after the segment that makes them."""
    if not plan.host:
        return
    made_in = {op.output: s for s, seg in enumerate(segments) for op in seg.ops}
    unknown = [n for n in plan.host if n not in made_in]
    if unknown:
        raise InvalidPlanError(
            f"the plan places on host values no unit of this model makes: {_names(unknown)} (host names unit outputs, "
            f"never the call's inputs)"
        )
    result = ops[-1].output if ops else None
    read_in: dict[str, set[int]] = {}
    for s, seg in enumerate(segments):
        for op in seg.ops:
            for name in op.inputs:
                read_in.setdefault(name, set()).add(s)
    for name in plan.host:
        if name == result:
            raise InvalidPlanError(f"the plan places the model's result {name} on host; the result stays on the device")
    inside = [n for n in plan.host if not any(s > made_in[n] for s in read_in.get(n, ()))]
    if inside:
        raise InvalidPlanError(
            f"the plan places on host {_names(inside)}, but no later segment reads "
            f"{'them' if len(inside) > 1 else 'it'}: only values that cross a segment boundary can live on host"
        )


def _check_streamed(plan: ComponentPlan, ops: list[Op]) -> None:
    if not plan.streamed:
        return
    blocks = list(dict.fromkeys(block_of(op.name) for op in ops))
    # or a finer streaming block (an adapter's stream_parts): a module path inside a block, around units
    inner = {b for b in plan.streamed for op in ops
             if (op.name == b or op.name.startswith(b + ".")) and b.startswith(block_of(op.name) + ".")}
    unknown = [b for b in plan.streamed if b not in blocks and b not in inner]
    if unknown:
        raise InvalidPlanError(
            f"the plan streams blocks this model does not have: {_names(unknown)} (its blocks: {_names(blocks, 12)})"
        )
    twice = sorted({b for b in plan.streamed if plan.streamed.count(b) > 1})
    if twice:
        raise InvalidPlanError(f"the plan streams {_names(twice)} more than once")


def _check_model(model: torch.nn.Module, plan: ComponentPlan) -> None:
    actual = fingerprint(model)
    if (actual.class_name, actual.config_hash) != (plan.model.class_name, plan.model.config_hash):
        raise PlanMismatchError(
            f"this plan was made for {plan.describe()}, "
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
    from ..planner.pipelines import pipeline_spec

    scale = pipe.vae_scale_factor
    dtype = dtype_name(pipe.unet.dtype)
    size = dict(frames=num_frames, latent_height=height // scale, latent_width=width // scale, dtype=dtype)
    components = [
        uniform_component(pipe.unet, k, SampleShape(batch=2 if guidance else 1, **size)),
        uniform_component(pipe.vae, k, SampleShape(batch=1, **size)),
    ]
    # the pipeline's other planned stages (SVD: the CLIP image encoder, the VAE encode under its own plan)
    spec = pipeline_spec(type(pipe).__name__)
    configs = {name: dict(getattr(m.config, "to_dict", lambda c=m.config: c)()) for name in spec.components
               if (m := getattr(pipe, name, None)) is not None}
    for stage, _, _ in spec.stages:
        name = spec.plan_name(stage)
        if stage not in spec.sliced or stage in ("denoise", "decode"):
            continue
        attribute = spec.attribute_of(name)
        shape = spec.stage_shape(stage, height, width, num_frames, guidance, dtype, configs)
        comp = uniform_component(getattr(pipe, attribute), k, shape, component=name if name != attribute else None)
        components.append(comp.model_copy(update={"attribute": attribute if name != attribute else None}))
    return Plan(pipeline=type(pipe).__name__, height=height, width=width, frames=num_frames, components=components)
