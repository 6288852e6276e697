"""Fast planning (issue 18, part 3) against the exact solvers it must agree with.

- ``solve``'s memoised per-placement tables give what a solve over freshly built ``SegmentCost``s
  gives (brute force over every path of a handmade profile; random placements and budgets on a
  shipped profile, DP and ILP);
- ``--max-latency`` (floor first, a bisection that skips residencies, shared cost models) gives the
  same or a better (peak, latency) than the plain bisection over every residency that it replaced;
- a fleet's grouped planning gives the plans ``plan_for`` gives pair by pair;
- absurd shapes are refused before any profiling, naming the latent size.
"""

from __future__ import annotations

import random

import pytest
from vramplan.planner import pipeline as pipeline_mod
from vramplan.planner import solve as solve_mod
from vramplan.planner.costs import CostModel
from vramplan.planner.errors import InfeasibleError, InvalidArgumentError
from vramplan.planner.gpus import find_gpu
from vramplan.planner.pipeline import PipelinePlanner, plan_pipeline
from vramplan.planner.plan import shipped_pipeline_profile
from vramplan.planner.solve import solve, table

from vramplan import plan_for


def test_table_is_what_the_cost_model_says_for_every_placement():
    prof = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", "flash")
    stage = next(s for s in prof.stages if s.profile is not None and s.per_step)
    model = CostModel(stage.profile, find_gpu("RTX 4090"))
    rng = random.Random(0)
    for _ in range(6):
        host = frozenset(rng.sample(model.placeable, min(4, len(model.placeable))))
        streamed = frozenset(rng.sample(model.streamable, rng.randint(0, len(model.streamable))))
        segs, needed, seconds = table(model, host, streamed)
        for i in rng.sample(range(len(segs)), 200):
            cost = model.cost(segs[i], host, streamed)
            assert (needed[i], seconds[i]) == (cost.needed_bytes, cost.seconds)


def test_tables_derived_from_a_near_placement_are_the_tables_built_from_scratch(monkeypatch):
    """The pruning drops one placed value at a time: each such table is derived from a kept one by
    re-costing only the segments whose span the dropped value touches. Every entry equals a table
    built from scratch on a fresh model (nothing kept to derive from), and the model's cost."""
    prof = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", "flash")
    stage = next(s for s in prof.stages if s.profile is not None and s.per_step)
    gpu = find_gpu("RTX 4090")
    model = CostModel(stage.profile, gpu)
    rng = random.Random(1)
    host = frozenset(rng.sample(model.placeable, min(6, len(model.placeable))))
    table(model, host)
    derived = []
    spans = solve_mod._spans
    monkeypatch.setattr(solve_mod, "_spans", lambda m, *a: derived.append(m) or spans(m, *a))
    chain = [host]
    for v in sorted(host):  # drop, then add back one: the derivation goes both ways
        chain.append(chain[-1] - {v})
    chain.append(chain[-1] | {sorted(host)[0]})
    for h in chain[1:]:
        segs, needed, seconds = table(model, h)
        fresh = CostModel(stage.profile, gpu)
        _, needed_fresh, seconds_fresh = table(fresh, h)
        assert (needed, seconds) == (needed_fresh, seconds_fresh)
        assert derived[-1] is model  # derived, not built from scratch
        for i in rng.sample(range(len(segs)), 100):
            cost = model.cost(segs[i], h)
            assert (needed[i], seconds[i]) == (cost.needed_bytes, cost.seconds)


def test_a_quiet_solve_returns_none_exactly_where_solve_raises():
    prof = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", "flash")
    stage = next(s for s in prof.stages if s.profile is not None and s.per_step)
    model = CostModel(stage.profile, find_gpu("RTX 4090"))
    _, needed, _ = table(model)
    floor = solve(model, max(needed), method="dp").costs  # fits: the largest candidate
    assert floor
    for budget in (0, min(needed) - 1, sorted(needed)[len(needed) // 2], max(needed)):
        try:
            loud = solve(model, budget, method="dp")
        except InfeasibleError:
            loud = None
        quiet = solve(model, budget, method="dp", explain=False)
        assert (quiet is None) == (loud is None)
        if loud is not None:
            assert (quiet.segments, quiet.latency_s) == (loud.segments, loud.latency_s)


@pytest.mark.parametrize("method", ["dp", "ilp"])
def test_fast_solve_is_the_brute_force_optimum_on_a_handmade_profile_with_placements(method):
    """Every placement and streamed set of the handmade profile, at a few budgets: the memoised tables
    give the optimum over every plan built unit by unit (tests/test_planner.brute_force)."""
    from test_planner import MIB, brute_force, handmade

    model = CostModel(handmade(), find_gpu("RTX 4090"))
    for host, streamed in ((frozenset(model.placeable), frozenset()), (frozenset(), frozenset(model.streamable))):
        if True:
            for budget in (700 * MIB, 520 * MIB):
                best = brute_force(model, budget, None, host, streamed)
                try:
                    got = solve(model, budget, method=method, host=host, streamed=streamed)
                except InfeasibleError:
                    assert best is None
                    continue
                assert got.latency_s == pytest.approx(best[0][0], rel=1e-9)


@pytest.mark.parametrize("method", ["dp", "ilp"])
def test_fast_solve_with_placement_matches_the_ilp_and_dp(method):
    prof = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", "efficient")
    stage = next(s for s in prof.stages if s.profile is not None and s.per_step)
    model = CostModel(stage.profile, find_gpu("2080Ti"))
    rng = random.Random(1)
    for _ in range(1):
        host = frozenset(rng.sample(model.placeable, 3))
        streamed = frozenset(rng.sample(model.streamable, len(model.streamable) // 2))
        budget = rng.randint(2, 6) * 2**30
        for limit in (None, 1.5):
            try:
                a = solve(model, budget, limit, method, host=host, streamed=streamed)
            except InfeasibleError:
                with pytest.raises(InfeasibleError):
                    solve(model, budget, limit, "dp" if method == "ilp" else "ilp", host=host, streamed=streamed)
                continue
            b = solve(model, budget, limit, "dp" if method == "ilp" else "ilp", host=host, streamed=streamed)
            if limit is None:
                assert a.latency_s == pytest.approx(b.latency_s, rel=1e-9)
            else:
                assert a.needed_bytes == pytest.approx(b.needed_bytes, rel=1e-6)  # the ILP's peak is in GiB


def _bisection_over_every_residency(profile, gpu, max_latency_s):
    """The search the fast path replaced: bisect the cap at 1 MiB over every residency, from scratch."""
    pipeline_mod._MODELS.clear()
    planner = PipelinePlanner(profile, gpu, gpu.memory_usable_bytes, 25, "expandable_segments")

    def best(cap):
        found = None
        for resident in planner.residencies():
            results = planner.evaluate(resident, cap)
            if results is None or planner.latency(results) > max_latency_s:
                continue
            key = (planner.latency(results), planner.peak(results))
            found = key if found is None or key < found else found
        return found

    lo, hi = planner.floor()[0], gpu.memory_usable_bytes
    while hi - lo > 2**20:
        mid = (lo + hi) // 2
        if best(mid) is not None:
            hi = mid
        else:
            lo = mid
    return best(hi)


@pytest.mark.parametrize("model,gpu,factor", [("svd", "RTX 4090", 1.2), ("animatediff", "2080Ti", 1.02)])
def test_max_latency_plans_are_the_same_or_better_than_the_plain_bisection(model, gpu, factor):
    g = find_gpu(gpu)
    kernel = g.attention_kernel
    profile = shipped_pipeline_profile(model, 512, 512, 14 if model == "svd" else 16, True, "fp16", kernel)
    fastest = plan_pipeline(profile, g, method="dp")
    limit = round(fastest.prediction.latency_s * factor, 3)
    fast = plan_pipeline(profile, g, max_latency_s=limit, method="dp")
    latency, peak = _bisection_over_every_residency(profile, g, limit)
    assert fast.prediction.latency_s <= limit
    assert fast.prediction.peak_bytes <= peak + 2**20  # within the bisection's resolution, or lower
    if fast.prediction.peak_bytes >= peak:
        assert fast.prediction.latency_s <= round(latency, 4) + 1e-4


def test_cost_models_are_shared_per_profile_and_gpu():
    profile = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", "flash")
    gpu = find_gpu("RTX 4090")
    a = PipelinePlanner(profile, gpu, gpu.memory_usable_bytes, 25, "expandable_segments")
    b = PipelinePlanner(profile, gpu, gpu.memory_usable_bytes // 2, 50, "expandable_segments")
    c = PipelinePlanner(profile, gpu, gpu.memory_usable_bytes, 25, "expandable_segments", pinned=False)
    assert all(a.models[s] is b.models[s] for s in a.models)
    assert all(a.models[s] is not c.models[s] for s in a.models)  # pageable prices differ


def test_fleet_groups_give_the_plans_plan_for_gives():
    from vramplan.planner import capacity

    capacity._PLANS.clear()
    key = ("RTX 4090", "svd", 512, 512, None, True, "fp16", 25, None, None)
    done = dict(capacity._plan_pairs([(key, 60.0, 0.05)]))
    assert len(done) == 2  # the workload's fastest plan and its smallest peak within 5 %
    for k, plan in done.items():
        alone = plan_for(gpu=k[0], model=k[1], height=k[2], width=k[3], guidance=k[5], dtype=k[6], steps=k[7],
                         host_ram_gb=k[8], max_latency_s=k[9])
        assert (plan.prediction.peak_bytes, plan.prediction.latency_s) == (
            alone.prediction.peak_bytes, alone.prediction.latency_s)


@pytest.mark.parametrize("kwargs,latent", [
    (dict(frames=100000), "100000 x 72x128"),
    (dict(height=65536, width=65536), "14 x 8192x8192"),
])
def test_absurd_shapes_are_refused_before_profiling_naming_the_latent(kwargs, latent, monkeypatch):
    import vramplan.api as api

    monkeypatch.setattr(api, "find_pipeline_profile", lambda *a, **k: pytest.fail("profiled an absurd shape"))
    with pytest.raises(InvalidArgumentError, match=latent):
        plan_for(gpu="RTX 4090", model="svd", **{"height": 576, "width": 1024, **kwargs})
