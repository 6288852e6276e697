"""Lower bounds that let whole-pipeline planning skip work (issue 18, part 3), against what they skip; and the
floor a refusal states.

- :func:`.bounds.seconds_bound` and :func:`.bounds.unbounded` never exceed what :func:`.placement.search`
  returns at a budget, and the relaxation behind them holds candidate by candidate for random placements
  (shipped UNet and decode along rows);
- stage alternatives planned with the bounds give the plan of planning every alternative in full, without
  them: the same fastest plan; under ``max_latency_s`` the same or a better one;
- the floor a refusal states is exact: its ``min_usable_bytes`` plans, one byte less is refused (SVD's floor
  is set by its VAE encode, which the decode's streamed VAE blocks do not relieve).
"""

from __future__ import annotations

import math
import random

import pytest
from vramplan.planner import pipeline as pipeline_mod
from vramplan.planner.alternatives import variants
from vramplan.planner.bounds import _Relaxed, seconds_bound, unbounded
from vramplan.planner.errors import InfeasibleError
from vramplan.planner.gpus import find_gpu
from vramplan.planner.pipeline import cost_model, plan_pipeline
from vramplan.planner.placement import floor, search
from vramplan.planner.plan import shipped_pipeline_profile
from vramplan.planner.schema import Plan

GIB, MIB = 2**30, 2**20


@pytest.fixture(scope="module")
def animatediff():
    return shipped_pipeline_profile("animatediff", 512, 512, 16, True, "fp16", "flash")


def _models(profile, gpu):
    rows = variants(profile)[1][1]
    unet = next(s for s in profile.stages if s.per_step and s.profile is not None)
    decode = next(s for s in rows.stages if s.stage == "decode")
    assert decode.plan_name == "vae_rows"
    return [cost_model(s.profile, gpu, "expandable_segments", True) for s in (unet, decode)]


def test_the_bound_never_exceeds_the_search(animatediff):
    gpu = find_gpu("RTX 4090")
    unet, rows = _models(animatediff, gpu)
    for model, tight in ((unet, True), (rows, False)):  # (the rows decode's tight searches take seconds)
        assert unbounded(model) <= seconds_bound(model, 2**62) * (1 + 1e-12)
        bottom = floor(model).needed_bytes
        for budget in (bottom - MIB, *((bottom + 64 * MIB, GIB) if tight else ()), 2 * GIB, 8 * GIB):
            bound = seconds_bound(model, budget)
            try:
                found = search(model, budget, method="dp")
            except InfeasibleError:
                continue
            assert bound != math.inf and found.latency_s >= bound
            assert found.latency_s >= unbounded(model)


def test_the_relaxation_holds_for_every_candidate_and_placement(animatediff):
    """Each candidate's need with any placement is at least its relaxed need, and its seconds at least its
    seconds with nothing placed, plus host-link time where it needs placed values it reads or writes (its
    need without them is above): at least the smallest such value, and the bytes it is over (placing a
    value lowers a state by at most its bytes, times the allocator factor)."""
    gpu = find_gpu("RTX 4090")
    rng = random.Random(3)
    checked = 0
    for model in _models(animatediff, gpu):
        relaxed = _Relaxed(model, 8)
        segs = model.segments(8)
        everything = frozenset(model.streamable)
        for _ in range(3):
            host = frozenset(v for v in model.placeable if rng.random() < 0.5)
            streamed = frozenset(b for b in model.streamable if rng.random() < 0.5)
            credit = model.streamed_weight_bytes(streamed)
            for i in rng.sample(range(len(segs)), min(len(segs), 150)):
                cost = model.cost(segs[i], host, streamed)
                assert cost.needed_bytes - credit >= relaxed.need[i]
                # the streaming that lowers its need most: the relaxation's
                need = model.cost(segs[i], host, everything).needed_bytes - model.streamed_weight_bytes(everything)
                over = relaxed.link_need[i] - need
                link = max(relaxed.link[i], (over - 1) * relaxed.per_byte[i]) if over > 0 else 0.0
                checked += over > 0
                assert cost.seconds >= (relaxed.seconds[i] + link) * (1 - 1e-12)
    assert checked > 50  # (placements that lower candidates' needs below what needs no placed value)


def test_the_memoised_bound_is_the_relaxation_at_the_budget_or_lower(animatediff):
    """The bound is memoised between two levels of the candidates' needs: never above the relaxation's
    shortest path at the budget itself."""
    rng = random.Random(5)
    for model in _models(animatediff, find_gpu("RTX 4090")):
        relaxed = _Relaxed(model, 8)
        low, high = min(relaxed.levels), max(relaxed.levels)
        for budget in [rng.randint(low - MIB, high + MIB) for _ in range(40)] + relaxed.link_need[:20]:
            assert relaxed.at(budget) <= relaxed._shortest(budget, budget)


def _same(a: Plan, b: Plan) -> bool:
    return a.model_dump(exclude={"solver"}) == b.model_dump(exclude={"solver"})


def _in_full(profile, gpu, monkeypatch, **kwargs) -> Plan:
    """Every alternative planned in full (no bound skips a residency or an alternative), the best taken as
    :func:`.alternatives.plan_alternatives` takes it."""
    with monkeypatch.context() as m:
        m.setattr(pipeline_mod.PipelinePlanner, "_bounds", lambda self, budgets, cap: {s: 0.0 for s in budgets})
        plans = [plan_pipeline(v, gpu, **kwargs) for _, v in variants(profile)]
    bounded = kwargs.get("max_latency_s") is not None

    def key(i):
        p = plans[i].prediction
        return (p.peak_bytes, p.latency_s, i) if bounded else (p.latency_s, p.peak_bytes, i)

    return plans[min(range(len(plans)), key=key)]


def test_fastest_plans_with_bounds_are_the_plans_of_every_alternative_in_full(animatediff, monkeypatch):
    """On the 3050 Laptop the decode along rows is skipped residency by residency: the denoiser's seconds at
    each budget plus the rows decode's bound exceed the frames decode's plan."""
    g = find_gpu("RTX 3050 Laptop")
    pipeline_mod._MODELS.clear()
    full = _in_full(animatediff, g, monkeypatch, method="dp")
    pipeline_mod._MODELS.clear()
    assert _same(plan_pipeline(animatediff, g, method="dp"), full)


def test_max_latency_plans_with_bounds_are_the_same_or_better(monkeypatch):
    profile = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", "flash")
    g = find_gpu("RTX 4090")
    limit = round(plan_pipeline(profile, g, method="dp").prediction.latency_s * 1.2, 3)
    pipeline_mod._MODELS.clear()
    full = _in_full(profile, g, monkeypatch, method="dp", max_latency_s=limit).prediction
    pipeline_mod._MODELS.clear()
    fast = plan_pipeline(profile, g, method="dp", max_latency_s=limit).prediction
    assert fast.latency_s <= limit
    assert fast.peak_bytes <= full.peak_bytes
    if fast.peak_bytes == full.peak_bytes:
        assert fast.latency_s <= full.latency_s


def test_the_refusal_states_the_smallest_memory_that_plans():
    """SVD's floor at 512x512 on the 2080 Ti is set by its VAE encode (unsliced mid-block attention): the
    decode's streamed VAE blocks are not credited to it (its search counts the VAE whole). It stated
    ~0.79 GiB where ~0.83 GiB was the least that planned; now the least that plans, to the byte."""
    profile = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", "efficient")
    gpu = find_gpu("2080Ti")

    def plan(usable):
        return plan_pipeline(profile, gpu, usable_bytes=usable, host_ram_bytes=64 * GIB)

    with pytest.raises(InfeasibleError) as err:
        plan(GIB // 2)
    need = err.value.min_usable_bytes
    assert err.value.stage == "encode_vae" and err.value.min_peak_bytes <= need
    found = plan(need)
    assert found.prediction.peak_bytes <= need
    with pytest.raises(InfeasibleError) as below:
        plan(need - 1)
    assert below.value.min_usable_bytes == need
