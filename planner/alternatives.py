"""Stages with alternative component plans: the planner takes, per stage, whichever plans best. No torch.

A pipeline may list other component plans a sliced stage can run under
(``PipelineSpec.stage_alternatives``: SVD's and AnimateDiff's decode along rows, ``vae_rows``, beside the
frames decode ``vae``), and a profile may carry that stage profiled under each
(``PipelineProfile.alternatives``). A unit has one slicing axis, so each alternative is a whole stage
profile of its own; the stages interact only through the residency and what the budget leaves, so each
choice of one plan per stage (a handful) is planned as a whole pipeline, and the fastest feasible run
is taken (under ``max_latency_s``: the smallest peak that meets it). The default plans come first, so on
a tie nothing changes; a plan records the choice as its stages' and components' names, and
:func:`as_planned` gives the profile a plan was made from (integrity's recomputation).
"""

from __future__ import annotations

import itertools

from .errors import InfeasibleError, PlanMismatchError, UnsupportedModelError
from .schema import PipelineProfile, Plan, StageProfile


def _listed(profile: PipelineProfile) -> dict[str, tuple[str, ...]]:
    """stage -> the alternative plan names its pipeline lists (empty for a pipeline vramplan does not know)."""
    from .pipelines import pipeline_spec

    try:
        return dict(pipeline_spec(profile.pipeline).stage_alternatives)
    except UnsupportedModelError:
        return {}


def options(profile: PipelineProfile) -> dict[str, list[StageProfile]]:
    """stage -> its profiles, the default first then each alternative the profile carries. Refuses an
    alternative the pipeline does not list, or one for a stage the profile does not slice."""
    listed = _listed(profile)
    sliced = {s.stage: s for s in profile.stages if s.profile is not None}
    out: dict[str, list[StageProfile]] = {}
    for alt in profile.alternatives:
        base = sliced.get(alt.stage)
        if base is None or alt.profile is None or alt.plan_name not in listed.get(alt.stage, ()) \
                or alt.component != base.component:
            allowed = ", ".join(f"{s} -> {'/'.join(p)}" for s, p in listed.items()) or "none"
            raise PlanMismatchError(
                f"the {profile.model_name} profile offers the {alt.stage} stage under {alt.plan_name!r} (on "
                f"{alt.component}), which {profile.pipeline} does not list (its alternatives: {allowed}): the profile "
                f"was edited or made by another vramplan. Profile the pipeline again (vramplan profile).")
        out.setdefault(alt.stage, [base]).append(alt)
    return out


def variants(profile: PipelineProfile) -> list[tuple[dict[str, str], PipelineProfile]]:
    """Every choice of one plan per stage with alternatives, as (stage -> plan name, a profile without
    alternatives whose stages are that choice); the all-default choice first."""
    found = options(profile)
    if not found:
        return [({}, profile)]
    out = []
    names = list(found)
    for combo in itertools.product(*(found[s] for s in names)):
        chosen = dict(zip(names, combo, strict=True))
        stages = [chosen.get(s.stage, s) for s in profile.stages]
        variant = profile.model_copy(update={"stages": stages, "alternatives": []})
        out.append(({s: p.plan_name for s, p in chosen.items()}, variant))
    return out


def plan_alternatives(plan_fn, profile: PipelineProfile, gpu, **kwargs) -> Plan:
    """``plan_fn(profile, gpu, **kwargs)`` (:func:`.pipeline.plan_pipeline`) over every choice of the
    stages' plans: the fastest feasible plan (under ``max_latency_s``: the smallest peak, then the
    fastest); the default first on a tie. When none fits, the refusal of the choice that comes closest:
    one that fits the GPU but not the host memory budget, else the smallest reachable peak."""
    from .pipeline import CannotWin

    latency_bound = kwargs.get("max_latency_s") is not None
    best, errors = None, []
    for i, (_, variant) in enumerate(variants(profile)):
        wanted = {}
        if best is not None:  # only a plan that can win: ties go to the earlier choice
            p = best[1].prediction
            # a latency over this rounds (to 0.1 ms, as plans state it) above the best's
            wanted = {"peak_at_most": p.peak_bytes} if latency_bound else {"beat_latency_s": p.latency_s + 1e-4}
        try:
            plan = plan_fn(variant, gpu, **kwargs, **wanted)
        except CannotWin:
            continue
        except InfeasibleError as err:
            errors.append((i, err))
            continue
        p = plan.prediction
        key = (p.peak_bytes, p.latency_s, i) if latency_bound else (p.latency_s, p.peak_bytes, i)
        if best is None or key < best[0]:
            best = (key, plan)
    if best is not None:
        return best[1]
    raise min(errors, key=lambda e: _closeness(*e))[1]


def _closeness(i: int, err: InfeasibleError) -> tuple:
    if getattr(err, "part", None) == "pinned host memory":
        return (0, 0, i)
    floor = getattr(err, "min_peak_bytes", None)
    return (1, floor if floor is not None else float("inf"), i)


def as_planned(profile: PipelineProfile, plan: Plan) -> PipelineProfile:
    """The profile ``plan`` was made from: each stage with alternatives under the plan the plan's stage
    names (the default when it names none the profile has: integrity then reports the mismatch)."""
    if not profile.alternatives:
        return profile
    named = {s.stage: s.component for s in plan.stages}
    for choice, variant in variants(profile):
        if all(named.get(stage, name) == name for stage, name in choice.items()):
            return variant
    return variants(profile)[0][1]


def plan_problems(plan: Plan) -> list[str]:
    """A plan's stages with alternatives against its pipeline's plan names: each under its own plan or one
    of the alternatives its pipeline lists, and sliced under one of them only."""
    from .errors import VramplanError
    from .pipelines import pipeline_spec

    try:
        spec = pipeline_spec(plan.pipeline) if plan.pipeline else None
    except VramplanError:
        return []
    if spec is None:
        return []
    out = []
    for i, pred in enumerate(plan.stages):  # (a stage without alternatives: the recomputation checks it)
        allowed = spec.plan_names(pred.stage) if pred.stage in spec.stage_alternatives else ()
        if allowed and pred.component not in allowed:
            out.append(f"field 'stages[{i}].component' is {pred.component!r}, but {plan.pipeline} runs its "
                       f"{pred.stage} stage under {' or '.join(repr(a) for a in allowed)}")
    sliced = {c.component for c in plan.components if c.shape is not None}
    for stage in spec.stage_alternatives:
        both = [p for p in spec.plan_names(stage) if p in sliced]
        if len(both) > 1:
            out.append(f"field 'components' slices the {stage} stage under {' and '.join(both)}: a stage runs under "
                       f"one plan")
    return out
