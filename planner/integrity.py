"""A plan file is data that must agree with itself and with its model. No torch.

:func:`check_plan` refuses, with one line naming the field, a plan whose

- numbers are absurd: NaN, infinite or negative predictions, steps beyond any scheduler;
- prediction disagrees with itself: a peak that is not the sum of its parts, a stage peak that is not
  context + margin + weights + held + needed, a top-level peak, latency or host memory that is not
  the stages' (these need no profile);
- header (height, width, frames) disagrees with its components' shapes;
- components contradict themselves: depth above k, duplicate host / recompute / streamed entries,
  slicing, placement or streaming on an unsliced component (``resident`` with streamed blocks is not
  a contradiction: the blocks stream, the other weights stay; the recomputed prediction checks it);
- components disagree with the model's profile (shipped, or passed in): a unit that does not exist, k
  on a unit without an axis or beyond its axis length, a group that is not a run of one axis, a
  recompute list that is not the one its groups imply, a host value that never leaves its segment, a
  streamed block the model cannot stream, a Step Rehash cut that is not one of the model's cuts;
- stated prediction is not what the profile gives for its slicing, placement and streaming:
  the prediction is recomputed with the planner's own cost model and compared field by field.

Recomputing needs the plan's profile: a shipped pipeline profile found by the plan's header, or one
passed in (``verify`` finds or makes it). Without one only the checks that need none run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

from .alternatives import as_planned, plan_problems
from .errors import PlanIntegrityError, VramplanError
from .schema import ComponentPlan, ModelProfile, PipelineProfile, Plan

# The most denoising steps a plan may state (diffusers' schedulers train on 1000 timesteps).
MAX_STEPS = 1000
# Relative disagreement allowed between a stated and a recomputed number (JSON keeps integers exact;
# the planner rounds seconds to 4-6 decimals, hence the absolute allowance for seconds).
REL_TOL = 1e-6
SECONDS_TOL = 2e-3


def check_plan(plan: Plan, profile: PipelineProfile | ModelProfile | None = None, *, source: str = "plan",
               find_profile: bool = True) -> None:
    """Raise :class:`PlanIntegrityError` naming the first field that is wrong (and how many more are);
    ``profile``: the plan's profile (default: the shipped one its header names, if any)."""
    found = problems(plan, profile, find_profile=find_profile)
    if found:
        more = f" (and {len(found) - 1} more problem{'s' * (len(found) > 2)})" if len(found) > 1 else ""
        raise PlanIntegrityError(f"{source}: {found[0]}{more}; make a new plan (vramplan plan)")


def problems(plan: Plan, profile: PipelineProfile | ModelProfile | None = None, *,
             find_profile: bool = True) -> list[str]:
    """Every integrity problem of ``plan``, one line each, the field named first."""
    out = list(_numbers(plan))
    out += list(_steps(plan))
    out += list(_self_consistent(plan))
    for comp in plan.components:
        out += list(_component(comp))
    out += plan_problems(plan)  # each stage under a plan its pipeline lists (its own or an alternative)
    if out:  # recomputing an absurd plan would only add noise (or fail)
        return out
    if profile is None and find_profile:
        profile = shipped_profile(plan)
    if isinstance(profile, PipelineProfile):  # each stage with alternatives under the plan this one took
        profile = as_planned(profile, plan)
    out += list(_header(plan, profile))
    if profile is None or out:
        return out
    profiles = stage_profiles(plan, profile)
    for comp in plan.components:
        if comp.component in profiles:
            out += list(_against_profile(comp, profiles[comp.component]))
    step = next((s.component for s in getattr(profile, "stages", ()) if s.per_step and s.profile is not None), "unet")
    if plan.rehash is not None and step in profiles:
        out += list(_rehash_cut(plan, profiles[step], profile))
    if out:
        return out
    return list(_recomputed(plan, profile))


# -- the plan's profile ------------------------------------------------------------------------------
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def shipped_profile(plan: Plan) -> PipelineProfile | None:
    """The shipped pipeline profile of the plan's model, size and attention kernel (None if none is)."""
    from .plan import shipped_pipeline_profile

    if not (plan.pipeline and plan.model_name and plan.height and plan.width and plan.frames and plan.target):
        return None
    if not _NAME.match(plan.model_name.lower()):  # a path or a hub id: never a shipped file name
        return None
    found = profile_key(plan)
    if found is None:
        return None
    try:
        return shipped_pipeline_profile(plan.model_name, plan.height, plan.width, plan.frames, *found,
                                        plan.target.attention_kernel)
    except (VramplanError, OSError, ValueError):
        return None


def profile_key(plan: Plan) -> tuple[bool, str] | None:
    """(guidance, dtype) of a pipeline plan, read off its denoiser's shape (None: no sliced denoiser)."""
    from .pipelines import pipeline_spec

    try:
        spec = pipeline_spec(plan.pipeline)
    except VramplanError:
        return None
    name = next((c for s, c, _ in spec.stages if s == "denoise"), None)
    denoiser = next((c for c in plan.components if c.component == name and c.shape is not None), None)
    if denoiser is None:
        return None
    return denoiser.shape.batch == spec.guidance_batch, denoiser.shape.dtype


def stage_profiles(plan: Plan, profile: PipelineProfile | ModelProfile) -> dict[str, ModelProfile]:
    """Component plan name -> the ModelProfile of its sliced stage (a stage's own plan: ``vae_encoder``)."""
    if isinstance(profile, ModelProfile):
        return {profile.component: profile}
    return {s.plan_name: s.profile for s in profile.stages if s.profile is not None}


# -- numbers -----------------------------------------------------------------------------------------
def _walk(value, where: str) -> Iterator[tuple[str, float]]:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int | float):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{where}[{i}]")


def _numbers(plan: Plan) -> Iterator[str]:
    parts = {"prediction": plan.prediction, "solver": plan.solver, "rehash": plan.rehash, "target": plan.target}
    for name, part in parts.items():
        if part is not None:
            yield from _bad_numbers(part.model_dump(), name)
    for i, st in enumerate(plan.stages):
        yield from _bad_numbers(st.model_dump(), f"stages[{i}]")


def _bad_numbers(data: dict, where: str) -> Iterator[str]:
    for field, value in _walk(data, where):
        if isinstance(value, float) and not math.isfinite(value):
            yield f"field '{field}' is {value}: a prediction must be a finite number"
        elif value < 0:
            yield f"field '{field}' is {value}: it cannot be negative"


def _steps(plan: Plan) -> Iterator[str]:
    if plan.target is not None and plan.target.steps > MAX_STEPS:
        yield f"field 'target.steps' is {plan.target.steps}: at most {MAX_STEPS} denoising steps make sense"
    if plan.rehash is not None:
        if plan.rehash.steps > MAX_STEPS:
            yield f"field 'rehash.steps' is {plan.rehash.steps}: at most {MAX_STEPS} denoising steps make sense"
        elif plan.target is not None and plan.rehash.steps != plan.target.steps:
            yield (f"field 'rehash.steps' is {plan.rehash.steps}, but the plan is for target.steps="
                   f"{plan.target.steps}")


def _close(stated: float, computed: float, seconds: bool = False) -> bool:
    tol = max(abs(computed) * REL_TOL, SECONDS_TOL if seconds else 1.0)
    return abs(stated - computed) <= tol


def _self_consistent(plan: Plan) -> Iterator[str]:
    """The prediction against its own parts and stages (no profile needed)."""
    pred = plan.prediction
    if pred is None:
        return
    parts = (pred.context_bytes + pred.weight_bytes + pred.live_bytes + pred.transient_bytes + pred.streamed_bytes
             + pred.allocator_bytes + pred.margin_bytes)
    if not _close(pred.peak_bytes, parts):
        yield (f"field 'prediction.peak_bytes' is {pred.peak_bytes}, but its parts (context + weights + live + "
               f"transient + streamed + allocator + margin) sum to {parts}")
    for i, st in enumerate(plan.stages):
        total = pred.context_bytes + pred.margin_bytes + st.weight_bytes + st.held_bytes + st.needed_bytes
        if not _close(st.peak_bytes, total):
            yield (f"field 'stages[{i}].peak_bytes' is {st.peak_bytes}, but context + margin + its weights, held "
                   f"tensors and needed bytes are {total}")
    if not plan.stages:
        return
    worst = max(plan.stages, key=lambda s: s.peak_bytes)
    if not _close(pred.peak_bytes, worst.peak_bytes):
        yield (f"field 'prediction.peak_bytes' is {pred.peak_bytes}, but the largest stage peak is "
               f"{worst.peak_bytes} ({worst.stage})")
    seconds = sum(s.seconds for s in plan.stages)
    if not _close(pred.latency_s, seconds, seconds=True) and abs(pred.latency_s - seconds) > 1e-4 * len(plan.stages):
        yield f"field 'prediction.latency_s' is {pred.latency_s}, but its stages take {seconds:.4f} s"
    host = max(s.host_bytes - s.streamed_bytes for s in plan.stages) + sum(s.streamed_bytes for s in plan.stages)
    if not _close(pred.host_bytes, host):
        yield (f"field 'prediction.host_bytes' is {pred.host_bytes}, but its stages need {host} (every streamed "
               f"block + the largest stage's placed values)")


# -- the header ---------------------------------------------------------------------------------------
def _header(plan: Plan, profile) -> Iterator[str]:
    """Header (height, width, frames) == every sliced component's shape."""
    sliced = [c for c in plan.components if c.shape is not None]
    if not sliced or plan.height is None or plan.width is None or plan.frames is None:
        return
    expected, exact = {}, True
    if isinstance(profile, PipelineProfile):
        if (profile.height, profile.width, profile.frames) != (plan.height, plan.width, plan.frames):
            yield (f"the plan's header ({plan.frames} x {plan.height}x{plan.width}) is not its profile's "
                   f"({profile.frames} x {profile.height}x{profile.width})")
            return
        expected = {c: p.shape for c, p in stage_profiles(plan, profile).items()}
    elif profile is None:
        expected, exact = _spec_shapes(plan)
    given = _spec_shapes(plan)[0] if isinstance(profile, ModelProfile) else expected  # what the pipeline gives
    dtype = sliced[0].shape.dtype
    batches = _batches(plan)
    header = f"{plan.frames} x {plan.height}x{plan.width}"
    not_latent = _not_latent(plan)
    for comp in sliced:
        shape = comp.shape
        where = f"components[{comp.component}].shape"
        if shape.dtype != dtype and comp.attribute is None:  # a stage's own plan may run upcast (the VAE encode)
            yield f"field '{where}.dtype' is {shape.dtype}, but components[{sliced[0].component}] runs in {dtype}"
        if comp.component in batches and shape.batch not in batches[comp.component]:
            yield (f"field '{where}.batch' is {shape.batch}, but {plan.pipeline} runs its {comp.component} on a batch "
                   f"of {' or '.join(map(str, sorted(batches[comp.component])))}")
        want = expected.get(comp.component)
        fields = ("batch", "frames", "latent_height", "latent_width", "dtype") if exact else ("frames",)
        for name in fields if want is not None else ():
            if getattr(shape, name) != getattr(want, name):
                yield (f"field '{where}.{name}' is {getattr(shape, name)}, but the plan's header ({header}) needs "
                       f"{getattr(want, name)}")
        if want is not None and exact:
            continue
        known = given.get(comp.component)  # a stage whose sample is in pixels (an encoder's) is not a VAE scale away
        if known is not None and (known.latent_height, known.latent_width) == (shape.latent_height, shape.latent_width):
            continue
        if comp.component in not_latent:  # an encoder of a model whose configs a plan does not make us read
            continue
        h, w = plan.height / shape.latent_height, plan.width / shape.latent_width
        if h != w or h != int(h) or int(h) & (int(h) - 1):
            yield (f"field '{where}' has latents {shape.latent_height}x{shape.latent_width}, which no VAE scale "
                   f"factor maps to the plan's {plan.height}x{plan.width} pixels (height and width swapped?)")


def _not_latent(plan: Plan) -> set[str]:
    """Component plans of ``plan``'s pipeline whose sample is tokens or pixels, not latents."""
    from .pipelines import pipeline_spec

    try:
        return pipeline_spec(plan.pipeline).pixel_or_token_plans() if plan.pipeline else set()
    except (VramplanError, KeyError, ValueError):
        return set()


def _spec_shapes(plan: Plan) -> tuple[dict, bool]:
    """(component -> the sample shape its pipeline gives the plan's header, exact). Exact for a catalogue
    model (its configs give the VAE scale); for a model named by a path or an id, whose files a plan
    should not make us read, only the frame count is known (``exact`` False): from the configs shipped
    with vramplan for a trained demo model (the trained tiny Wan's VAE is 2x temporal), else from the
    pipeline's own default factor."""
    from ..profiles import model_catalogue
    from .pipelines import pipeline_source, pipeline_spec

    key = profile_key(plan)
    if key is None or not plan.model_name:
        return {}, True
    try:
        spec = pipeline_spec(plan.pipeline)
        known = plan.model_name.lower() in model_catalogue()
        configs = pipeline_source(plan.model_name).configs if known else shipped_configs(plan.model_name)
        shapes = {name: spec.stage_shape(stage, plan.height, plan.width, plan.frames, key[0], key[1], configs)
                  for stage in spec.sliced for name in spec.plan_names(stage)}
        return shapes, known
    except (VramplanError, KeyError, ValueError, OSError):
        return {}, True


# Trained demo models shipped with vramplan: plan model_name -> their folder in vramplan.profiles.
SHIPPED_MODELS = {"trained-tiny-wan": "trained_wan"}


def shipped_configs(name: str) -> dict[str, dict] | None:
    """The component configs of a trained model shipped with vramplan (None for any other name): read
    from the package's own files, never from a path a plan names."""
    import json
    from importlib import resources

    folder = SHIPPED_MODELS.get(name.lower())
    if folder is None:
        return None
    root = resources.files("vramplan.profiles").joinpath(folder)
    configs = {}
    for part in root.iterdir():
        config = part.joinpath("config.json")
        if part.is_dir() and config.is_file():
            configs[part.name] = json.loads(config.read_text())
    return configs


def _batches(plan: Plan) -> dict[str, set[int]]:
    """Component -> the batches its pipeline runs it on (guidance: 1 or the guidance batch)."""
    try:
        from .pipelines import pipeline_spec

        spec = pipeline_spec(plan.pipeline)
    except VramplanError:
        return {}
    return {name: {1, spec.guidance_batch} if batch == "guidance" else {batch}
            for stage, batch in spec.sliced.items() for name in spec.plan_names(stage)}


# -- one component, on its own ------------------------------------------------------------------------
def _component(comp: ComponentPlan) -> Iterator[str]:
    where = f"components[{comp.component}]"
    if comp.shape is None:
        for name in ("slices", "groups", "recompute", "host", "streamed"):
            if getattr(comp, name):
                yield f"field '{where}.{name}' is set, but the component is not sliced (it has no shape)"
        return
    for i, g in enumerate(comp.groups):
        if g.depth > g.k:
            yield f"field '{where}.groups[{i}].depth' is {g.depth}: more slices in flight than the group's k={g.k}"
    for name in ("host", "recompute", "streamed"):
        values = getattr(comp, name)
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            yield f"field '{where}.{name}' lists {', '.join(twice[:3])} more than once"


# -- one component, against its profile ---------------------------------------------------------------
def _against_profile(comp: ComponentPlan, profile: ModelProfile) -> Iterator[str]:
    from .costs import CostModel  # noqa: F401 - the same units the cost model sees

    where = f"components[{comp.component}]"
    if comp.model.config_hash != profile.model.config_hash:
        yield (f"field '{where}.model' is {comp.model.describe()}, but the plan's header names a model whose "
               f"{comp.component} is {profile.model.describe()}")
        return
    units = {u.name: (i, u) for i, u in enumerate(profile.units)}
    # a rows group's slice counts are its last unit's, whose output rows it splits (CostModel.ks)
    ks = {u: units[g.units[-1]][1].scratch for g in comp.groups if g.axis == "rows" and g.units[-1] in units
          for u in g.units}
    for name, k in comp.slices.items():
        if name not in units:
            yield f"field '{where}.slices' names {name!r}, which is not a unit of {comp.component}"
            continue
        unit = units[name][1]
        if k > 1 and unit.axis is None:
            yield f"field '{where}.slices.{name}' is {k}, but {name} has no exact slicing axis (it runs whole)"
        elif unit.axis is not None and k > max(unit.axis_length, 1):
            yield (f"field '{where}.slices.{name}' is {k}: more slices than the {unit.axis_length} "
                   f"{unit.axis} of its axis")
        elif unit.axis is not None and k not in ks.get(name, unit.scratch):
            yield (f"field '{where}.slices.{name}' is {k}, a slice count the profile did not measure (it has "
                   f"{', '.join(map(str, sorted(ks.get(name, unit.scratch))[:8]))}, ...): its memory cannot be "
                   f"predicted")
    in_group: dict[str, int] = {}
    derived: list[str] = []
    for gi, g in enumerate(comp.groups):
        gw = f"{where}.groups[{gi}]"
        missing = [u for u in g.units if u not in units]
        if missing:
            yield f"field '{gw}.units' names {missing[0]!r}, which is not a unit of {comp.component}"
            continue
        pos = [units[u][0] for u in g.units]
        if pos != list(range(pos[0], pos[0] + len(pos))):
            yield f"field '{gw}.units' is not a run of consecutive units (starting at {g.units[0]})"
            continue
        made: set[str] = set()
        for u in g.units:
            unit = units[u][1]
            if unit.axis != g.axis:
                yield f"field '{gw}.axis' is {g.axis}, but {u} slices along {unit.axis or 'no axis'}"
                break
            if g.k > max(unit.axis_length, 1):
                yield f"field '{gw}.k' is {g.k}: more slices than the {unit.axis_length} {unit.axis} of {u}"
                break
            if unit.needs_input_stats and unit.inputs and unit.inputs[0] in made:
                derived.append(u)
            made.add(u)
            in_group[u] = gi
    listed = list(comp.recompute)
    extra = [u for u in listed if u not in derived]
    if extra:
        yield (f"field '{where}.recompute' lists {extra[0]}, but no group makes its statistics input (recompute is "
               f"for a statistics unit after the unit that makes its input, in one group)")
    missing = [u for u in derived if u not in listed]
    if missing:
        yield f"field '{where}.recompute' misses {missing[0]}, whose statistics input its own group makes"
    segment_of = {}
    seg = 0
    for i, u in enumerate(profile.units):
        if i and not (u.name in in_group and in_group.get(profile.units[i - 1].name) == in_group[u.name]):
            seg += 1
        segment_of[u.name] = seg
    readers: dict[str, list[int]] = {}
    for u in profile.units:
        for name in u.inputs:
            readers.setdefault(name, []).append(segment_of[u.name])
    for name in comp.host:
        if name not in units:
            yield f"field '{where}.host' names {name!r}, which is not a value a unit of {comp.component} makes"
        elif name == profile.result:
            yield f"field '{where}.host' names {name}, the model's result (it stays on the device)"
        elif not any(s > segment_of[name] for s in readers.get(name, [])):
            yield f"field '{where}.host' names {name}, which no later segment reads (it never leaves the GPU)"
    streamable = {b for b, w in profile.block_weights.items() if w > 0}
    blocks = list(dict.fromkeys(u.block for u in profile.units))
    for b in comp.streamed:
        if b not in streamable:
            known = "a block of this model" if b in blocks else "not a block of this model"
            yield f"field '{where}.streamed' names {b!r}, which cannot be streamed ({known} without its own weights)" \
                if b in blocks else f"field '{where}.streamed' names {b!r}, {known}"


def _rehash_cut(plan: Plan, unet: ModelProfile, profile) -> Iterator[str]:
    from .rehash import (
        calls_per_step,
        candidate_cuts,
        cfg_split,
        expert_firsts,
        offered_cut,
        profile_nodes,
        valid_cuts,
    )

    cuts = valid_cuts(profile_nodes(unet.units), unet.result, candidate_cuts(unet.units))
    if not offered_cut(plan.rehash.cut, cuts):  # a cut, or per-step CFG reuse over one
        shown = ", ".join(cuts[:4]) + (f" and {len(cuts) - 4} more" if len(cuts) > 4 else "")
        yield f"field 'rehash.cut' is {plan.rehash.cut!r}, not one of the model's Step Rehash cuts ({shown})"
    elif isinstance(profile, PipelineProfile) and (
            missing := sorted(set(expert_firsts(profile, plan.rehash.steps)) - set(plan.rehash.key_steps))):
        yield (f"field 'rehash.key_steps' lacks step {missing[0]}, where {profile.pipeline}'s second expert takes over: "
               f"its first step is a key step (a cache of the other expert cannot be reused)")
    elif plan.rehash.half_steps and not (cfg_split(plan.rehash.cut)[0] and cfg_split(plan.rehash.cut)[1]):
        yield (f"field 'rehash.half_steps' is {plan.rehash.half_steps}, but half steps (one CFG call reused) need "
               f"per-step CFG reuse over a cut ('cfg+<cut>'), not {plan.rehash.cut!r}")
    elif cfg_split(plan.rehash.cut)[0] and isinstance(profile, PipelineProfile):
        stage = next(s for s in profile.stages if s.per_step and s.profile is not None)
        if calls_per_step(profile, stage, plan.rehash.steps) < 2:
            yield (f"field 'rehash.cut' is {plan.rehash.cut!r}: per-step CFG reuse needs two model calls per step, "
                   f"and {profile.pipeline} makes one (its guidance, if any, is one batched call)")


# -- the prediction, recomputed ------------------------------------------------------------------------
def recompute(plan: Plan, profile: PipelineProfile) -> Plan:
    """``plan`` with its prediction and stages recomputed from ``profile`` by the planner's cost model,
    for its own slicing, groups, placement, streaming, residency and Step Rehash schedule."""
    from .costs import CostModel  # noqa: F401
    from .gpus import find_gpu
    from .pipeline import PipelinePlanner, _assemble
    from .plan import segments_of
    from .solve import Solution

    target = plan.target
    gpu = find_gpu(target.gpu)
    rehash = None
    if plan.rehash is not None:
        from .rehash import StageRehash

        rehash = StageRehash.of(plan.rehash, profile)  # with the pipeline's model calls per step
    planner = PipelinePlanner(profile, gpu, target.usable_bytes, target.steps, target.allocator, rehash,
                              target.pinned)
    solutions = {}
    for stage in profile.stages:
        if stage.profile is None:
            continue
        model = planner.models[stage.stage]
        comp = plan.component(stage.plan_name)
        host, streamed = frozenset(comp.host), frozenset(comp.streamed)
        segments = segments_of(model, comp)
        transfer, exposed = model.streaming_seconds(streamed)
        solutions[stage.stage] = Solution(
            segments, [model.cost(s, host, streamed) for s in segments], "recomputed", "Optimal", 0.0, 0.0, 0,
            host, streamed, model.streamed_weight_bytes(streamed), transfer, exposed,
        )
    resident = {c.component: plan.component(c.component).resident for c in profile.components}
    results = planner.results(resident, solutions, target.usable_bytes)
    if results is None:
        raise PlanIntegrityError("a stage the plan runs whole does not fit, or a resident component streams")
    return _assemble(profile, planner, resident, results, target.usable_bytes, target.max_latency_s)


def _recomputed(plan: Plan, profile) -> Iterator[str]:
    if not isinstance(profile, PipelineProfile) or plan.prediction is None or plan.target is None:
        return
    expected = [c.component for c in profile.components]
    expected += [s.plan_name for s in profile.stages if s.profile is not None and s.plan_name not in expected]
    names = {c.component for c in plan.components}
    if names != set(expected):
        older = [s for s in profile.stages if s.profile is not None and s.plan_component and s.plan_name not in names]
        if older and names < set(expected):
            s = older[0]
            yield (f"field 'components' has no {s.plan_name}: the plan was made before vramplan sliced the "
                   f"{s.stage} stage of {s.component} (under its own plan, {s.plan_name}), so its prediction no "
                   f"longer holds")
            return
        yield (f"field 'components' names {', '.join(c.component for c in plan.components)}, but the pipeline has "
               f"{', '.join(expected)}")
        return
    for comp in plan.components:
        if comp.attribute in names and comp.resident != plan.component(comp.attribute).resident:
            yield (f"field 'components[{comp.component}].resident' is {comp.resident}, but it runs on "
                   f"{comp.attribute}, whose residency is {plan.component(comp.attribute).resident}")
    try:
        again = recompute(plan, profile)
    except PlanIntegrityError as err:
        yield str(err)
        return
    yield from _compare(plan.prediction.model_dump(), again.prediction.model_dump(), "prediction")
    if len(plan.stages) != len(again.stages):
        yield f"field 'stages' has {len(plan.stages)} stages, but the pipeline has {len(again.stages)}"
        return
    for i, (a, b) in enumerate(zip(plan.stages, again.stages, strict=True)):
        yield from _compare(a.model_dump(), b.model_dump(), f"stages[{i}]")
    if plan.rehash is not None:
        yield from _rehash_numbers(plan, profile)


_SKIP = {"allocator_model", "latency_calibrated"}


def _compare(stated: dict, computed: dict, where: str) -> Iterator[str]:
    for key, value in stated.items():
        if key in _SKIP:
            continue
        want = computed.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and isinstance(want, int | float):
            if not _close(value, want, seconds=isinstance(value, float) or isinstance(want, float)):
                yield f"field '{where}.{key}' is {value}, but the plan's profile gives {want}"
        elif value != want:
            yield f"field '{where}.{key}' is {value!r}, but the plan's profile gives {want!r}"


def _rehash_numbers(plan: Plan, profile: PipelineProfile) -> Iterator[str]:
    from .gpus import find_gpu
    from .rehash import rehash_numbers

    r, target = plan.rehash, plan.target
    # per per-step stage (Wan 2.2's experts: their own steps), each model call of a step priced and cached
    computed = rehash_numbers(profile, plan, find_gpu(target.gpu), target.allocator, target.pinned, r.cut,
                              r.key_steps, r.half_steps, r.steps)
    stated = {k: getattr(r, k) for k in computed if getattr(r, k) is not None}
    yield from _compare(stated, computed, "rehash")
