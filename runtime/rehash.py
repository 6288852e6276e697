"""Step Rehash at run time: full UNet calls on key steps, reuse calls in between.

The reuse program is *derived* from the adapter's unit program by the dependency walk of
:func:`vramplan.planner.rehash.reuse_names`: with the cut given, only the ops the result still
needs run (conv_in, the down ops feeding the skip connections read after the cut, the up path
after the cut, the head). Both programs run on the plan's segments (a reuse segment is a plan
segment restricted to reuse ops), so rehash composes with slicing and grouping; a group across
the cut is refused. On a key step the executor keeps the cut (``keep``: never a reused buffer)
and the handle caches it, whole CFG batch at once, until the next key step; the cache is dropped
after the last step and reset whenever the pipeline sets its scheduler's timesteps (every call).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from ..planner.errors import PlanConflictError
from ..planner.rehash import (
    CfgReuseError,
    RehashCutError,
    RehashStepsError,
    SchedulerOrderError,
    cfg_cut,
    cfg_split,
    check_groups,
    cut_values,
    residual_span,
    reuse_names,
    valid_cuts,
)
from ..planner.schema import ComponentPlan, Plan, RehashPlan
from .adapters.base import adapter_for
from .apply import (
    PlanHandle,
    _check_shape,
    _checkpointing,
    build_segments,
    component_for,
    fingerprint,
    sample_shape,
)
from .executor import Segment, compute_device, execute, unit_by_unit
from .hooks import PLAN_HOOK, _original_method, get_hook, register_hook
from .program import Op, Program, UnitSpec
from .straight import Straight, straight_ok

_MISSING = object()


def rehash_cuts(model: torch.nn.Module) -> list[str]:
    """The model's candidate cuts (from its adapter) whose reuse program still reads the step's input."""
    adapter = adapter_for(model)
    if not hasattr(adapter, "rehash_cuts"):
        raise RehashCutError(f"{type(model).__name__} has no Step Rehash cuts (only UNets have)")
    ops, result = adapter.ops(model)
    return valid_cuts(_nodes(ops), result, adapter.rehash_cuts(model))


def check_cut(model: torch.nn.Module, cut: str, cuts: list[str] | None = None) -> None:
    """Refuse a value that is not one of the model's rehash cuts (``cuts``, if already known): an arbitrary
    value, or a layer after the last skip connection, whose reuse would replay a stale output whatever the
    step's latents."""
    cuts = rehash_cuts(model) if cuts is None else cuts
    cfg, base = cfg_split(cut)
    if cfg and (base is None or base in cuts):
        return
    if cut not in cuts:
        raise RehashCutError(f"{cut!r} is not a rehash cut of this {type(model).__name__}; its cuts: {', '.join(cuts)}")


def cfg_cuts(model: torch.nn.Module) -> list[str]:
    """Per-step CFG reuse (:func:`vramplan.planner.rehash.cfg_split`), alone and on top of each residual
    cut of the model (a UNet's feature cuts hold the CFG batch in one call: no second call to skip)."""
    return [cfg_cut(), *(cfg_cut(c) for c in rehash_cuts(model) if residual_span(c) is not None)]


def _nodes(ops: list[Op]) -> list[tuple[str, tuple[str, ...]]]:
    return [(op.output, op.inputs) for op in ops]


def cache_name(cut: str) -> str:
    """The reuse program's input the cache is bound to: the cut itself, or a residual span's residual."""
    cut = cfg_split(cut)[1]
    return cut if residual_span(cut) is None else f"{cut}:residual"


def cache_of(cut: str, kept: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a key step caches from its kept values: the cut, or the span's residual ``end - start``."""
    cut = cfg_split(cut)[1]
    span = residual_span(cut)
    return kept[cut] if span is None else kept[span[1]] - kept[span[0]]


def _add_residual(ctx, start: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return start + residual


def reuse_ops(ops: list[Op], result: str, cut: str) -> list[Op]:
    """The ops a reuse call runs: what ``result`` needs given ``cut``, in program order. For a residual
    cut, one op in place of the span's end: ``end = start + residual`` (whole, unsliced)."""
    cut = cfg_split(cut)[1]
    if cut is None:  # CFG reuse alone: the first call runs whole
        return list(ops)
    names = set(reuse_names(_nodes(ops), result, cut))
    out = [op for op in ops if op.output in names]
    span = residual_span(cut)
    if span is None:
        return out
    start, end = span
    pos = {op.output: i for i, op in enumerate(ops)}
    made = ops[pos[end]]
    add = Op(UnitSpec(end, None, kind="residual"), (start, cache_name(cut)), end, _add_residual, made.layout)
    i = sum(1 for op in out if pos[op.output] < pos[end])
    return [*out[:i], add, *out[i:]]


def reuse_segments(segments: list[Segment], ops: list[Op], cut: str) -> list[Segment]:
    """The plan's segments restricted to ``ops``; refuses a group that runs across ``cut`` (either end
    of a residual span). A residual cut's add op runs as a segment of its own where the span ended."""
    cut = cfg_split(cut)[1]
    if cut is None:  # CFG reuse alone: the first call runs whole
        return list(segments)
    check_groups(((f"starting at {s.ops[0].name}", [op.output for op in s.ops]) for s in segments), cut)
    keep = {id(op) for op in ops}
    out = []
    for seg in segments:
        mine = [op for op in seg.ops if id(op) in keep]
        if mine:
            out.append(dataclasses.replace(seg, ops=mine))  # keeps k and depth
    span = residual_span(cut)
    if span is not None:
        pos = {op.output: i for i, op in enumerate(op for seg in segments for op in seg.ops)}
        add = next(op for op in ops if op.spec.kind == "residual" and op.output == span[1])
        i = sum(1 for seg in out if pos[seg.ops[-1].output] < pos[span[1]])
        out.insert(i, Segment([add], None, 1))
    return out


def execute_keeping(program: Program, segments: list[Segment], keep: set[str], around_segment=None):
    """Run ``program`` and return (its output, the ``keep`` values, untouched by buffer reuse)."""
    out = execute(program, segments, keep=frozenset(keep), around_segment=around_segment)
    return out, {name: program.kept[name] for name in keep}


@dataclass
class StepRecord:
    step: int
    key: bool
    seconds: float


@dataclass(eq=False)
class RehashHandle(PlanHandle):
    """The UNet's plan hook (``vramplan.plan``) with Step Rehash: the plan's slicing on every call, the
    whole program on key steps, the reuse program on the others. Given the pipeline it also wraps the
    scheduler's ``set_timesteps`` (start of every pipeline call: reset and checks) and ``step`` (the end of
    a denoising step: a pipeline that calls the model more than once per step, as Wan's CFG does, gets
    one cache per call of the step). ``remove()`` restores them; ``records`` lists the calls of the last
    pipeline call."""

    rehash: RehashPlan | None = None
    reuse: list[Op] = field(default_factory=list)
    reuse_segs: list[Segment] = field(default_factory=list)
    scheduler: object = None
    step: int = 0
    call: int = 0  # calls of the model within the current step
    caches: dict[int, torch.Tensor] = field(default_factory=dict)  # per call of a step
    offsets: dict[int, torch.Tensor] = field(default_factory=dict)  # CFG reuse: call - first call, at key steps
    first: torch.Tensor | None = None  # CFG reuse: this step's first call's output
    first_out: object = None  # ... as the model returned it (tuple or output class)
    records: list[StepRecord] = field(default_factory=list)
    experts: dict = field(default_factory=dict)  # Wan 2.2: transformer_2's handle (its part of the schedule)
    pipe: object = None  # given for a second expert's handle: where it takes over is checked against the keys
    _saved_set_timesteps: object = _MISSING
    _saved_step: object = _MISSING
    # unsliced calls skip the executor: key calls run the stock forward (where the adapter shows the cut values
    # there: stock_values), others run straight (runtime/straight.py); False: always the executor
    straight: bool = True
    _straights: dict = field(default_factory=dict)
    _hooks_checked: bool = False
    _keys: frozenset | None = None  # the schedule's key steps, as a set (looked up at every call)
    _halves: frozenset = frozenset()  # its half steps (CFG reuse over a cut: only the second call reused)
    _stock_map: dict | None = None  # the adapter's stock_values

    @property
    def cache(self) -> torch.Tensor | None:
        """The cache of a step's first (or only) call."""
        return self.caches.get(0)

    def __enter__(self) -> RehashHandle:
        return self

    def reset_state(self) -> None:
        """Per-call state (called by the hook registry at and after every pipeline call): the cache
        and the step counter; the records of the last call stay readable."""
        self.step, self.call, self.caches, self.offsets, self.first = 0, 0, {}, {}, None

    def reset(self) -> None:
        """Start a new pipeline call: no cache, step 0, no records."""
        self.reset_state()
        self.records = []

    def remove(self) -> None:
        for expert in reversed(list(self.experts.values())):  # wrapped the scheduler after this one
            expert.remove()  # (kept: its records stay readable)
        super().remove()
        if self.scheduler is not None and self._saved_set_timesteps is not _MISSING:
            if self._saved_set_timesteps is None:
                self.scheduler.__dict__.pop("set_timesteps", None)
            else:
                self.scheduler.set_timesteps = self._saved_set_timesteps
            self._saved_set_timesteps = _MISSING
        if self.scheduler is not None and self._saved_step is not _MISSING:
            if self._saved_step is None:
                self.scheduler.__dict__.pop("step", None)
            else:
                self.scheduler.step = self._saved_step
            self._saved_step = _MISSING
        self.caches, self.offsets, self.first = {}, {}, None

    @property
    def all_records(self) -> list[StepRecord]:
        """The calls of the last pipeline call, of this model and of a second expert's."""
        return sorted([*self.records, *(r for e in self.experts.values() for r in e.records)], key=lambda r: r.step)

    @property
    def key_steps(self) -> list[int]:
        return sorted({r.step for r in self.all_records if r.key})

    @property
    def reused_steps(self) -> list[int]:
        return sorted({r.step for r in self.all_records if not r.key})

    def _after_step(self) -> None:
        """The scheduler finished a step: the next model call starts the next step."""
        if self.call == 1 and cfg_split(self.rehash.cut)[0]:
            raise CfgReuseError(
                "per-step CFG reuse (cut 'cfg...') needs a pipeline that calls the model twice per step (conditional, "
                "unconditional), but this step made one call (guidance_scale <= 1, or CFG batched into one call). "
                "Plan a schedule without CFG reuse.")
        if self.call == 0:  # the other expert ran this step: this one's caches are of no use any more
            self.caches, self.offsets = {}, {}
        self.step, self.call, self.first = self.step + 1, 0, None
        if self.step >= self.rehash.steps:
            self.caches, self.offsets = {}, {}  # not held through the decode

    def _after_set_timesteps(self) -> None:
        self.reset()
        check_scheduler_order(self.scheduler)
        n = len(self.scheduler.timesteps)
        if n != self.rehash.steps:
            raise RehashStepsError(
                f"the pipeline runs {n} denoising steps, but the plan's rehash schedule is for "
                f"{self.rehash.steps}. Call it with num_inference_steps={self.rehash.steps} or plan for {n} steps."
            )
        first = expert_first_step(self.pipe, self.scheduler) if self.pipe is not None else None
        if first is not None and first not in self.rehash.key_steps:
            raise RehashStepsError(
                f"{type(self.pipe).__name__} switches to its second expert ({EXPERT}) at step {first}, but the "
                f"schedule's key steps {self.rehash.key_steps} do not include it: an expert's first step runs whole "
                f"(the other expert's cache cannot be reused). Plan with the pipeline's profile (plan_for keys it) or "
                f"add step {first} to key_steps.")

    def wrap(self, module, call_next, args, kwargs):
        step = self.step
        if step >= self.rehash.steps:
            raise SchedulerOrderError(
                f"UNet call {step + 1} with a rehash schedule of {self.rehash.steps} steps: the scheduler makes "
                f"more than one UNet call per step (e.g. Heun), or the pipeline was called again without a reset. "
                f"Use a first-order scheduler, attach rehash with the pipeline (apply_rehash(pipe, plan)) or call "
                f"handle.reset() between calls."
            )
        cut = self.rehash.cut
        cfg, base = cfg_split(cut)
        slot = self.call
        if self._keys is None:
            self._keys = frozenset(self.rehash.key_steps)
            self._halves = frozenset(self.rehash.half_steps)
        key_step = step in self._keys
        if cfg and slot > 0:
            return self._cfg_call(module, call_next, args, kwargs, step, slot, key_step)
        # a half step (CFG reuse over a cut): the first call runs whole and refreshes nothing, the second is reused
        half = step in self._halves
        key = key_step or (base is not None and not half and slot not in self.caches)
        whole = key or half
        kept = frozenset(cut_values(cut)) if key and base is not None else frozenset()
        if key:
            self.caches.pop(slot, None)  # a key step never reads it: one cache held, as the planner counts
        ops, segments = (self.ops, self.segments) if whole or base is None else (self.reuse, self.reuse_segs)
        started = time.perf_counter()
        stock = self._stock_values(kept, args, kwargs) if whole else None
        if stock is not None:
            out = self._stock_call(call_next, args, kwargs, stock)
        else:
            out = self._execute(ops, segments, args, kwargs, None if whole else self.caches.get(slot), kept)
        if kept:
            self.caches[slot] = cache_of(cut, self.program_kept)
        if cfg:
            self.first, self.first_out = _output_tensor(out), out
        _sync(self.caches.get(slot))
        self.records.append(StepRecord(step, key, time.perf_counter() - started))
        self._count_call()
        return out

    def _execute(self, ops, segments, args, kwargs, cache, kept):
        """One call of the model's program ``ops`` (the reuse program reads ``cache``) on the plan's segments."""
        checkpoint = torch.is_grad_enabled() and _checkpointing(self.model)
        cut = self.rehash.cut
        with self.bridged(segments) as around:
            binding = adapter_for(self.model).bind(self.model, *args, **kwargs)
            if self.plan.shape is not None:
                _check_shape(self.plan, binding.shape)
            env, layouts = binding.env, binding.layouts
            if cache is not None:
                env, layouts = ({**env, cache_name(cut): cache}, {**layouts, cache_name(cut): self._cut_layout})
            program = Program(ops, env, layouts, self.result, binding.finish, binding.globals)
            placement = self.placement(program)
            if placement:  # host values of this call only: a reuse call has fewer ops, the cut is its input
                placement["host"] = placement["host"] & {op.output for op in ops} - {cut} - kept
            if self.straight and around is None and straight_ok(segments, compute_device(program), checkpoint,
                                                                **placement):
                out = self._straight(ops, segments, kept).run(program)  # what execute() does, less bookkeeping
            else:
                out = execute(program, segments, keep=kept, around_segment=around, checkpoint=checkpoint,
                              **placement)
            self.program_kept = program.kept
        return out

    def _stock_values(self, kept: frozenset, args, kwargs) -> dict | None:
        """Where a key call's ``kept`` values appear in the stock forward (the adapter's ``stock_values``:
        value -> (module path, 'input' | 'output'); an adapter without it never runs stock), if the call may
        run the stock forward: the plan changes nothing about how the model runs (one slice per segment,
        nothing placed, streamed or bridged), so the stock forward computes what the plan's program does
        (exact by the executor's contract, at the stock forward's speed); else None (the plan's program)."""
        if not self.straight or self.plan.host or self.plan.streamed:
            return None
        if self._stock_map is None:
            self._stock_map = getattr(adapter_for(self.model), "stock_values", lambda _m: None)(self.model) or {}
        if not self._stock_map or not kept <= self._stock_map.keys():
            return None
        checkpoint = torch.is_grad_enabled() and _checkpointing(self.model)
        param = next(self.model.parameters(), None)
        if param is None or not straight_ok(self.segments, param.device, checkpoint) or self.check_hooks():
            return None
        if self.plan.shape is not None:  # the plan's shape check, from the sample (the executor's reads the binding)
            if args:
                sample = args[0]
            else:  # the adapter's bind names the sample: its first parameter after the model
                import inspect

                sample = kwargs[list(inspect.signature(adapter_for(self.model).bind).parameters)[1]]
            got = sample_shape(sample, self.model)
            _check_shape(self.plan, {**got.model_dump(), "dtype": sample.dtype})
        return {v: self._stock_map[v] for v in kept}

    def _stock_call(self, call_next, args, kwargs, where: dict):
        """The stock forward; the values of ``where`` read off its modules' inputs or outputs."""
        seen: dict[str, torch.Tensor] = {}
        hooks = []
        for value, (path, side) in where.items():
            module = self.model.get_submodule(path)
            if side == "input":
                hooks.append(module.register_forward_pre_hook(
                    lambda m, a, k, v=value: seen.__setitem__(v, a[0] if a else next(iter(k.values()))),
                    with_kwargs=True))
            else:
                hooks.append(module.register_forward_hook(
                    lambda m, a, o, v=value: seen.__setitem__(v, o if isinstance(o, torch.Tensor) else o[0])))
        try:
            out = call_next(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        self.program_kept = seen
        return out

    def _straight(self, ops, segments, kept) -> Straight:
        """The key or reuse program's straight run (its drops computed once, reused at every call)."""
        key = (id(segments), kept)
        if key not in self._straights:
            self._straights[key] = Straight(segments, self.result, kept)
        return self._straights[key]

    def check_hooks(self):
        """The plan hook's check of others' hooks, once per pipeline call (at its first model call) rather than
        at every call: a rehash run calls the model twice per step, and its reuse calls are short."""
        if self._hooks_checked and (self.step or self.call):
            return self._bridges
        self._hooks_checked = True
        return super().check_hooks()

    def _cfg_call(self, module, call_next, args, kwargs, step, slot, key_step):
        """A later call of a step under CFG reuse: at key steps (or before any offset) the whole program,
        and its offset from the step's first call is cached; otherwise no model work: the first call's
        output plus the cached offset."""
        started = time.perf_counter()
        if self.first is None:
            raise CfgReuseError("per-step CFG reuse: a later call of a step came before its first call")
        if key_step or slot not in self.offsets:
            self.offsets.pop(slot, None)
            if self._stock_values(frozenset(), args, kwargs) is not None:
                out = call_next(*args, **kwargs)
            else:
                out = self._execute(self.ops, self.segments, args, kwargs, None, frozenset())
            self.offsets[slot] = _output_tensor(out) - self.first
            key = True
        else:
            out = _with_tensor(self.first_out, self.first + self.offsets[slot])
            key = False
        _sync(self.offsets.get(slot))
        self.records.append(StepRecord(step, key, time.perf_counter() - started))
        self._count_call()
        return out

    def _count_call(self) -> None:
        if self._saved_step is _MISSING:  # no scheduler: one call per step
            self.step += 1
            if self.step == self.rehash.steps:
                self.caches, self.offsets = {}, {}  # not held through the decode
        else:
            self.call += 1

    @property
    def _cut_layout(self):
        return next(op.layout for op in self.ops if op.output == cut_values(self.rehash.cut)[-1])


class _AfterSchedulerMethod:
    """A scheduler method under a rehash handle: the original, then the handle's ``after`` (``step``: a
    denoising step ended; ``set_timesteps``: reset the cache and check the schedule). A copy or pickle of
    the scheduler gets its own plain method (the handle stays with the original), as copies of planned
    models run unplanned."""

    def __init__(self, handle: RehashHandle, name: str, after):
        self.handle, self.name, self.after = handle, name, after
        self.original = getattr(handle.scheduler, name)

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        self.after()
        return out

    def __reduce_ex__(self, protocol):
        return _original_method, (self.handle.scheduler, self.name)


def denoiser_attribute(pipe) -> str | None:
    """The pipeline attribute a rehash schedule runs on: its UNet, or its DiT (Wan's ``transformer``)."""
    return next((name for name in ("unet", "transformer") if getattr(pipe, name, None) is not None), None)


def apply_rehash(target, plan: Plan | RehashPlan, component: ComponentPlan | None = None) -> RehashHandle:
    """Run ``target``'s UNet under a rehash schedule (and its slicing, if ``plan`` has any) until
    ``remove()``. ``target``: a pipeline (its ``unet``; the cache resets whenever the pipeline sets
    its timesteps) or a UNet (call ``reset()`` between pipeline calls). The handle is the UNet's plan
    hook: a second plan on the UNet is refused, and so is a rehash on a UNet already under a plan.

    A pipeline with a second expert (Wan 2.2's ``transformer_2``, the low-noise steps) runs its steps under
    the same schedule with a handle of its own (``handle.experts``; removed with the handle): each expert
    keeps its own caches, and the expert's first step must be a key step of the schedule (refused at the
    pipeline call otherwise: a residual or offset of the other expert cannot be reused)."""
    name = denoiser_attribute(target)
    unet = getattr(target, name) if name is not None else target
    scheduler = getattr(target, "scheduler", None) if unet is not target else None
    if isinstance(plan, Plan):
        if plan.rehash is None:
            raise RehashStepsError("this plan has no rehash schedule; plan with rehash='uniform'|'greedy'|'optimal'")
        rehash = plan.rehash
        component = component_for(unet, plan)
    else:
        rehash = plan
    check_halves(rehash)
    handle = _attach(unet, rehash, component, scheduler)
    second = getattr(target, EXPERT, None) if unet is not target and name == "transformer" else None
    if second is not None:
        own = next((c for c in plan.components if c.component == EXPERT), None) if isinstance(plan, Plan) else None
        try:
            expert = _attach(second, rehash, component_for(second, own or plan) if isinstance(plan, Plan) else None,
                             scheduler, pipe=target)
        except BaseException:
            handle.remove()
            raise
        handle.experts[EXPERT] = expert
    return handle


EXPERT = "transformer_2"  # Wan 2.2's low-noise expert


def _attach(unet, rehash: RehashPlan, component: ComponentPlan | None, scheduler, pipe=None) -> RehashHandle:
    if get_hook(unet, PLAN_HOOK) is not None:
        raise PlanConflictError(
            f"{type(unet).__name__} already runs under a plan; remove that handle first "
            f"(apply_rehash applies the plan's slicing too)"
        )
    adapter = adapter_for(unet)
    ops, result = adapter.ops(unet)
    check_cut(unet, rehash.cut, valid_cuts(_nodes(ops), result, getattr(adapter, "rehash_cuts", lambda _m: [])(unet)))
    if component is not None and component.shape is not None:
        component = component_for(unet, component)
        segments, unsliced = build_segments(ops, component)
    else:
        component = ComponentPlan(component="unet", model=fingerprint(unet))
        segments, unsliced = unit_by_unit(ops), {}
    reuse = reuse_ops(ops, result, rehash.cut)
    handle = RehashHandle(unet, component, ops, result, segments, unsliced, method="forward", rehash=rehash,
                          reuse=reuse, reuse_segs=reuse_segments(segments, reuse, rehash.cut), scheduler=scheduler,
                          pipe=pipe)
    handle.check_hooks()
    register_hook(unet, handle, PLAN_HOOK, method="forward", innermost=True)
    if scheduler is not None:
        handle._saved_set_timesteps = scheduler.__dict__.get("set_timesteps")
        scheduler.set_timesteps = _AfterSchedulerMethod(handle, "set_timesteps", handle._after_set_timesteps)
        handle._saved_step = scheduler.__dict__.get("step")
        scheduler.step = _AfterSchedulerMethod(handle, "step", handle._after_step)
    return handle


def expert_first_step(pipe, scheduler) -> int | None:
    """The step where ``pipe``'s second expert takes over (Wan 2.2: the first timestep below
    ``boundary_ratio`` x the scheduler's training timesteps), None when it runs no step or every step."""
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if ratio is None:
        return None
    boundary = ratio * scheduler.config.num_train_timesteps
    high = sum(1 for t in scheduler.timesteps if float(t) >= boundary)
    return high if 0 < high < len(scheduler.timesteps) else None


def check_halves(rehash: RehashPlan) -> None:
    """Half steps (one CFG call reused, the other run whole) exist only under CFG reuse over a cut."""
    cfg, base = cfg_split(rehash.cut)
    if rehash.half_steps and (not cfg or base is None):
        raise RehashCutError(
            f"the schedule has half steps {rehash.half_steps}, but its cut {rehash.cut!r} is not per-step CFG reuse "
            f"over a cut ('cfg+<cut>'): only there does a step's first call run whole while the second is reused")


def _output_tensor(out) -> torch.Tensor:
    """The prediction of a model call's output (a tensor, a tuple, or an output class with ``sample``)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


def _with_tensor(like, tensor: torch.Tensor):
    """``tensor`` returned the way ``like`` was (tensor, tuple or output class)."""
    if isinstance(like, torch.Tensor):
        return tensor
    if isinstance(like, tuple):
        return (tensor, *like[1:])
    return type(like)(sample=tensor)


def _sync(t) -> None:
    if isinstance(t, torch.Tensor) and t.device.type == "cuda":
        torch.cuda.synchronize()


def check_scheduler_order(scheduler) -> None:
    """Step Rehash counts one UNet call per step: refuse a scheduler that makes more (Heun, ...)."""
    order = getattr(scheduler, "order", 1)
    if order != 1:
        raise SchedulerOrderError(
            f"{type(scheduler).__name__} calls the UNet {order} times per step, but the plan's Step Rehash "
            f"schedule counts one call per step. Use a first-order scheduler (Euler, DDIM, DPM++ 2M) or a plan "
            f"without rehash."
        )


def check_rehash_call(pipe, rehash: RehashPlan, call_kwargs: dict) -> None:
    """Refuse, before anything runs, a call whose scheduler or step count cannot follow the schedule;
    a call that does not say its steps gets the schedule's (``call_kwargs`` is filled in)."""
    check_scheduler_order(pipe.scheduler)
    steps = call_kwargs.setdefault("num_inference_steps", rehash.steps)
    if steps != rehash.steps:
        raise RehashStepsError(
            f"the call asks for num_inference_steps={steps}, but the plan's rehash schedule is for {rehash.steps} "
            f"steps. Run with {rehash.steps} steps or plan for {steps}."
        )


def flop_counter():
    """PyTorch's FLOP counter (matmul, convolution, attention), plus the CPU fused attention kernel,
    which it does not know and would count as zero (as ``runtime.opcount`` does for the profiles)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs):  # shapes, not tensors
        return sdpa_flop_count(query, key, value)

    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash})


def measure_cuts(unet: torch.nn.Module, shape, cuts: list[str]) -> tuple[int, dict[str, int], dict[str, int]]:
    """FLOPs (:func:`flop_counter`) of one full UNet call at ``shape``, of each cut's reuse call, and
    each cut's bytes: one full call keeping every cut, then one reuse call per cut. CFG reuse (``cfg``,
    ``cfg+<cut>``) is priced per call as the mean of a reuse step's two calls: the first whole (or under
    its cut), the second no model work; its cache: the offset (one output) plus its cut's."""
    asked = list(cuts)
    cuts = list(dict.fromkeys(b for c in asked if (b := cfg_split(c)[1]) is not None))
    adapter = adapter_for(unet)
    ops, result = adapter.ops(unet)
    args = adapter.example_inputs(unet, shape, device=next(unet.parameters()).device)  # where the model is
    layouts = {op.output: op.layout for op in ops}
    reuse_flops, sizes = {}, {}
    with torch.no_grad():
        with flop_counter() as counter:
            binding = adapter.bind(unet, *args)
            program = binding.program(ops, result)
            out, kept = execute_keeping(program, unit_by_unit(ops), {v for c in cuts for v in cut_values(c)})
        full = counter.get_total_flops()
        out = _output_tensor(out)
        for cut in cuts:
            reuse = reuse_ops(ops, result, cut)
            with flop_counter() as counter:
                binding = adapter.bind(unet, *args)
                last = cut_values(cut)[-1]
                program = Program(reuse, {**binding.env, cache_name(cut): cache_of(cut, kept)},
                                  {**binding.layouts, cache_name(cut): layouts[last]}, result, binding.finish,
                                  binding.globals)
                execute(program, unit_by_unit(reuse))
            reuse_flops[cut] = counter.get_total_flops()
            sizes[cut] = kept[last].numel() * kept[last].element_size()
    for cut in asked:
        cfg, base = cfg_split(cut)
        if cfg:
            reuse_flops[cut] = (full if base is None else reuse_flops[base]) // 2
            sizes[cut] = out.numel() * out.element_size() + (0 if base is None else sizes[base])
    return full, {c: reuse_flops[c] for c in asked}, {c: sizes[c] for c in asked}


def with_rehash(
    plan: Plan,
    unet: torch.nn.Module,
    *,
    mode: str,
    steps: int,
    keys: int | None = None,
    calibration=None,
    threshold: float | None = None,
    cut: str | None = None,
    max_unet_flops: int | None = None,
    min_psnr: float | None = None,
) -> Plan:
    """``plan`` (e.g. a hand-made uniform plan of a model without a shipped profile) with a Step Rehash
    schedule chosen as the planner does (see :func:`vramplan.planner.rehash.plan_rehash`), FLOPs
    counted by PyTorch on the real model; no latency prediction. ``max_unet_flops`` (UNet FLOPs per
    video) plays the latency target's part: per cut it sets how many key steps are allowed. With a
    calibration, cut, key count and key steps are searched together by predicted quality; ``min_psnr``:
    the fewest FLOPs predicted to reach that PSNR against the full run."""
    from ..planner.rehash import CalibrationRequiredError, load_calibration, rank_cuts

    cal, ref = load_calibration(calibration)
    if mode != "uniform" and cal is None:
        raise CalibrationRequiredError(f"rehash={mode!r} needs a calibration; without one only 'uniform' is offered")
    comp = component_for(unet, plan)
    if cal is not None:
        cal.check(comp.model, comp.shape, steps)
    if cut is not None:
        check_cut(unet, cut)
    cuts = [cut] if cut is not None else rehash_cuts(unet)
    if cal is not None:
        if cut is None and cal.calls_per_step == 2:  # CFG reuse: only where a step makes two calls
            cuts += cfg_cuts(unet)
        cuts = [c for c in cuts if c in {e.cut for e in cal.cuts}]
    if comp.groups:
        for c in list(cuts):  # cuts that a group of this plan runs across are not offered
            if any(v in g.units and g.units[-1] != v for g in comp.groups for v in cut_values(c)):
                cuts.remove(c)
    if not cuts:
        raise RehashCutError("no candidate cut lies on a segment boundary of this plan; plan with fewer groups")
    full, reuse, sizes = measure_cuts(unet, comp.shape, cuts)
    options = rank_cuts(reuse, full, steps, mode, keys, max_unet_flops, cal, threshold, min_psnr)
    if not options:
        raise RehashCutError(
            "no cut has a schedule within the limits (the FLOPs budget, the key steps, the calibrated gaps); "
            "allow more FLOPs or key steps, or calibrate with a larger max_gap"
        )
    best = options[0]
    c, key_steps, error, thr = best.cut, best.keys, best.error, best.threshold
    n, h = len(key_steps), len(best.halves)
    rehash = RehashPlan(
        mode=mode, cut=c, steps=steps, key_steps=key_steps, half_steps=list(best.halves),
        quality="calibrated" if cal is not None else "uncalibrated",
        predicted_error=None if error is None else round(error, 6),
        predicted_psnr=None if best.psnr is None else round(min(best.psnr, 200.0), 3), schedule=best.name,
        measured_psnr=None if best.measured is None else round(min(best.measured, 200.0), 3),
        threshold=None if thr is None or math.isinf(thr) else round(thr, 6),
        original_unet_flops=steps * full,
        unet_flops=n * full + h * reuse.get(cfg_cut(), 0) + (steps - n - h) * reuse[c],
        cache_bytes=_held_bytes(c, sizes[c], cal), calibration=ref,
    )
    return plan.model_copy(update={"rehash": rehash})


def _held_bytes(cut: str, size: int, cal) -> int:
    """Bytes the cache holds through denoising: one per model call of a step (Wan's CFG: two), as the
    calibration counted the calls; CFG reuse holds its cut's once (first call) and one offset per later call
    (``size`` already counts one of each). Without a calibration the calls per step are unknown: one."""
    calls = (cal.calls_per_step or 1) if cal is not None else 1
    return size if cfg_split(cut)[0] else size * calls


def split_groups_at(component: ComponentPlan, cuts) -> ComponentPlan:
    """``component`` with every group that runs across one of ``cuts`` split after it (a one-unit
    piece stays sliced, ungrouped), so that each cut exists whole and can be cached."""
    from ..planner.schema import Group

    cuts = {v for c in cuts for v in cut_values(c)}  # both ends of a residual span
    groups = [Group(units=p, axis=g.axis, k=g.k, depth=g.depth)
              for g in component.groups for p in _pieces(g, cuts) if len(p) > 1]
    # a statistics unit recomputes only while a unit of its piece makes its input (it follows one)
    inside = {u for g in groups for u in g.units[1:]}
    recompute = [u for u in component.recompute if u in inside]
    return component.model_copy(update={"groups": groups, "recompute": recompute})


def _pieces(group, cuts) -> list[list[str]]:
    pieces, piece = [], []
    for unit in group.units:
        piece.append(unit)
        if unit in cuts:
            pieces.append(piece)
            piece = []
    return [*pieces, piece] if piece else pieces
