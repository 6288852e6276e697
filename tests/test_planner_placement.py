"""Recompute, host placement, weight streaming and depth in the cost model and the planner's search.
Handmade profiles, costs worked out by hand; the search against brute force. No torch."""

from __future__ import annotations

import itertools

import pytest
from vramplan.planner.costs import LAUNCH_SECONDS, PAGEABLE_FRACTION, CostModel, Segment
from vramplan.planner.errors import InfeasibleError
from vramplan.planner.gpus import find_gpu
from vramplan.planner.placement import floor, search, trajectory
from vramplan.planner.plan import component_seconds, make_plan, segments_of
from vramplan.planner.schema import AllocatorProfile, ModelProfile, ModelRef, SampleShape, UnitProfile
from vramplan.planner.solve import minimax, solve

MIB = 2**20
GPU = find_gpu("RTX 4090")


def _unit(name, axis, inputs, out, length, scratch, stats=False, flops=10**9, kernels=5, shape=(4, 10)):
    return UnitProfile(
        name=name, axis=axis, needs_input_stats=stats, block=name.split(".")[0], inputs=inputs,
        output_bytes=out * MIB, output_shape=list(shape), axis_length=length, flops=flops,
        bytes_moved=out * MIB * 3, kernels=kernels, scratch={k: v * MIB for k, v in scratch.items()},
    )


def profile(block_weights=None, weight_mib=1000) -> ModelProfile:
    """a: a conv and a temporal res block split at its two norms (both need statistics; a.n2 reads
    a.conv for the residual); b: two frame units; c: an unsliced head (the result)."""
    units = [
        _unit("a.conv", "frames", ["x"], 100, 4, {1: 300, 2: 150, 4: 80}),
        _unit("a.n1", "tokens", ["a.conv"], 100, 6, {1: 220, 2: 110, 3: 80, 6: 40}, stats=True),
        _unit("a.n2", "tokens", ["a.n1", "a.conv"], 100, 6, {1: 240, 2: 120, 3: 90, 6: 50}, stats=True),
        _unit("b.up", "frames", ["a.n2", "a.conv"], 200, 4, {1: 400, 2: 210, 4: 110}, shape=(4, 20)),
        _unit("b.out", "frames", ["b.up"], 200, 4, {1: 250, 2: 130, 4: 70}, shape=(4, 20)),
        _unit("c.head", None, ["b.out"], 50, 0, {1: 90}, shape=(4, 5)),
    ]
    weights = {"a": 300 * MIB, "b": 500 * MIB, "c": 100 * MIB} if block_weights is None else block_weights
    return ModelProfile(
        model=ModelRef(class_name="Handmade", config_hash="0" * 64, name="handmade"),
        shape=SampleShape(batch=1, frames=4, latent_height=2, latent_width=3, dtype="fp16"),
        attention_kernel="flash", weight_bytes=weight_mib * MIB, globals_bytes=5 * MIB, result="c.head",
        units=units, original_peak_bytes=900 * MIB, block_weights=weights,
        allocator=AllocatorProfile(method="handmade", default={1: 1.0, 8: 1.0}, expandable_segments={1: 1.0, 8: 1.0},
                                   original_default=1.0, original_expandable_segments=1.0),
    )


def model(**kwargs) -> CostModel:
    return CostModel(profile(**kwargs), GPU)


# -- recompute ---------------------------------------------------------------------------------
def test_statistics_unit_inside_a_group_is_recomputed_and_priced_by_hand():
    m = model()
    seg = Segment(1, 2, 2)  # a.n1 + a.n2: a.n2's statistics input (a.n1) is made inside the group
    assert seg in m.segments()
    cost = m.cost(seg)
    assert cost.recompute == (2,)
    # memory: a.conv (alive for a.n2 and b.up) + globals at entry; a.n2's new buffer; a.n1's slice held
    entry = 5 * MIB + 100 * MIB
    assert cost.activation_bytes == entry + 100 * MIB + 50 * MIB + 120 * MIB  # later slice: half of a.n1 + scratch
    # latency: both units, both statistics passes, a.n2's slices written into its buffer, a.n1 once more
    t = m.unit_seconds
    launches = 2 * 5 * LAUNCH_SECONDS
    expected = (t[1] + launches) * 2 + t[2] + launches
    expected += 3 * 100 * MIB / m.bytes_per_s * 2 + 2 * 100 * MIB / m.bytes_per_s
    assert cost.seconds == pytest.approx(expected, rel=1e-12)
    assert cost.transfer_s == 0


def test_statistics_from_before_the_group_need_no_recompute():
    m = model()
    cost = m.cost(Segment(1, 1, 2))
    assert cost.recompute == ()
    # a.n1 at the start of a group reads a.conv from before: statistics from the full input
    assert Segment(1, 2, 3) in m.segments() and m.cost(Segment(1, 2, 3)).recompute == (2,)


def test_plan_lists_recomputed_units():
    m = model()
    sol = solve(m, 10**12, method="dp")
    from vramplan.planner.plan import plan_fields

    fields = plan_fields(m, sol)
    recomputed = [m.units[j].name for c in sol.costs for j in c.recompute]
    assert fields["recompute"] == recomputed
    for name in fields["recompute"]:
        group = next(g for g in fields["groups"] if name in g.units)
        assert group.units[0] != name


# -- host placement ------------------------------------------------------------------------------
def test_host_value_leaves_entry_is_staged_and_crosses_the_link():
    m = model()
    seg = Segment(1, 2, 2)
    host = frozenset({"a.conv"})
    cost = m.cost(seg, host)
    # entry: globals only; a.n2 stages half of a.conv during its call (and a.n1 too, before)
    assert cost.activation_bytes == 5 * MIB + 100 * MIB + 50 * MIB + 120 * MIB + 50 * MIB
    # link: a.conv read by a.n1, by a.n2, by a.n1's statistics pass and by the recompute of a.n1
    assert cost.transfer_s == pytest.approx(400 * MIB / m.link_bytes_per_s, rel=1e-12)
    assert cost.seconds == pytest.approx(m.cost(seg).seconds + cost.transfer_s, rel=1e-12)


def test_host_output_needs_no_device_buffer_and_is_written_once():
    m = model()
    seg = Segment(1, 2, 2)
    cost = m.cost(seg, frozenset({"a.n2"}))
    assert cost.activation_bytes == m.cost(seg).activation_bytes - 100 * MIB  # a.n2's buffer on host
    assert cost.transfer_s == pytest.approx(100 * MIB / m.link_bytes_per_s, rel=1e-12)


def test_unsliced_unit_stages_whole_host_inputs():
    m = model()
    seg = Segment(5, 5, 1)
    plain, placed = m.cost(seg), m.cost(seg, frozenset({"b.out"}))
    assert placed.activation_bytes == plain.activation_bytes  # out of entry, staged whole for the call
    assert placed.transfer_s == pytest.approx(200 * MIB / m.link_bytes_per_s, rel=1e-12)


def test_pageable_memory_is_slower():
    fast, slow = model(), CostModel(profile(), GPU, pinned=False)
    seg, host = Segment(1, 2, 2), frozenset({"a.conv"})
    assert slow.cost(seg, host).transfer_s == pytest.approx(fast.cost(seg, host).transfer_s / PAGEABLE_FRACTION)


def test_costs_are_memoised_per_relevant_placement():
    m = model()
    seg = Segment(4, 4, 2)
    assert m.cost(seg, frozenset({"a.n1"})) is m.cost(seg)  # a.n1 is dead by then: not relevant


# -- weight streaming -----------------------------------------------------------------------------
def test_streamed_blocks_present_touched_plus_next():
    m = model()
    streamed = frozenset({"a", "c"})
    assert m.present_blocks(Segment(0, 0, 2), streamed) == ["a", "c"]  # touches a; c is the next streamed
    assert m.present_blocks(Segment(3, 4, 2), streamed) == ["c"]  # b is resident; c prefetched
    assert m.present_blocks(Segment(5, 5, 1), streamed) == ["c"]
    seg = Segment(0, 0, 2)
    assert m.cost(seg, streamed=streamed).needed_bytes == m.cost(seg).needed_bytes + 400 * MIB
    assert m.cost(seg, streamed=streamed).streamed_bytes == 400 * MIB
    assert m.streamed_weight_bytes(streamed) == 400 * MIB


def test_streaming_exposed_time_by_hand():
    m = model()
    rate = m.link_bytes_per_s
    ta, tc = 300 * MIB / rate, 100 * MIB / rate
    clock5 = sum(m.unit_seconds[:5])
    total, exposed = m.streaming_seconds(frozenset({"a", "c"}))
    assert total == pytest.approx(ta + tc)
    # a is needed at once (nothing to hide behind); c is prefetched when a starts, needed at unit 5
    assert exposed == pytest.approx(ta + max(0.0, tc - clock5))


def test_budget_counts_streamed_weights_once():
    m = model()
    sol = solve(m, 2000 * MIB, method="dp", streamed=frozenset({"b"}))
    assert sol.streamed_weight_bytes == 500 * MIB
    assert sol.latency_s == pytest.approx(sum(c.seconds for c in sol.costs) + m.streaming_seconds(frozenset({"b"}))[1])


# -- depth ---------------------------------------------------------------------------------------
def test_depth_memory_by_hand():
    m = model()
    entry = 5 * MIB + 100 * MIB + 100 * MIB  # a.conv and a.n2, read by b.up
    one, two = m.cost(Segment(3, 4, 4)), m.cost(Segment(3, 4, 4, 2))
    # depth 1: b.out's last slices, its buffer, b.up's slice (200/4) and scratch 70
    assert one.activation_bytes == entry + 200 * MIB + 50 * MIB + 70 * MIB
    # depth 2: b.out computes the wave's second slice: its buffer, two slices of b.up, scratch
    assert two.activation_bytes == entry + 200 * MIB + 2 * 50 * MIB + 70 * MIB
    assert two.peak_unit == 4
    # depth 4, one wave: b.out allocates its buffer while all four slices of b.up and its first piece are
    # alive; while it computes later slices, b.up's slices it has read are gone already
    four = m.cost(Segment(3, 4, 4, 4))
    assert four.activation_bytes == entry + 200 * MIB + 4 * 50 * MIB + 50 * MIB
    launches = 4 * 5 * LAUNCH_SECONDS * 2
    assert one.seconds - two.seconds == pytest.approx(launches / 2, rel=1e-9)


def test_depth_offered_for_groups_of_four_slices_or_more():
    segs = model().segments()
    assert {s.depth for s in segs if s.stop > s.start and s.k >= 4} == {1, 2, 4}
    assert all(s.depth == 1 for s in segs if s.stop == s.start or s.k < 4)


# -- search against brute force ------------------------------------------------------------------
def _subsets(items):
    items = list(items)
    return [frozenset(c) for r in range(len(items) + 1) for c in itertools.combinations(items, r)]


def _feasible(m: CostModel, budget: int, host, streamed) -> bool:
    credit = m.streamed_weight_bytes(streamed)
    cands = [s for s in m.segments() if m.cost(s, host, streamed).needed_bytes <= budget + credit]
    return minimax(m.n, cands, lambda s: 0) is not None


def test_floor_is_the_least_over_every_placement_and_streamed_set():
    m = model()
    best = None
    for host in _subsets(m.placeable):
        for streamed in _subsets(m.streamable):
            credit = m.streamed_weight_bytes(streamed)
            peak, _, _ = minimax(m.n, m.segments(), lambda s, h=host, st=streamed: m.cost(s, h, st).needed_bytes)
            if best is None or peak - credit < best:
                best = peak - credit
    assert floor(m).needed_bytes == best


@pytest.mark.parametrize("budget_mib", [900, 600, 450, 350, 250, 100, -100, -300, -600])
def test_search_feasible_exactly_when_some_choice_is(budget_mib):
    m = model()
    budget = budget_mib * MIB
    exists = any(_feasible(m, budget, h, s) for h in _subsets(m.placeable) for s in _subsets(m.streamable))
    try:
        sol = search(m, budget, method="dp")
    except InfeasibleError as err:
        assert not exists
        assert err.min_needed_bytes == floor(m).needed_bytes
        assert "streamed" in str(err) and err.unit in {u.name for u in m.units}
        return
    assert exists
    assert sol.needed_bytes <= budget + sol.streamed_weight_bytes
    plain = None
    try:
        plain = solve(m, budget, method="dp")
    except InfeasibleError:
        pass
    if plain is not None:  # a plan that fits without placement is the plain one
        assert not sol.host and not sol.streamed
        assert sol.latency_s == plain.latency_s


def test_search_solution_equals_brute_force_at_its_placement():
    from test_planner import brute_force

    m = model()
    budget = 250 * MIB
    sol = search(m, budget, method="dp")
    assert sol.host or sol.streamed
    best = brute_force(m, budget, None, sol.host, sol.streamed)
    assert sol.latency_s == pytest.approx(best[0][0], rel=1e-9)


def test_trajectory_floors_decrease_to_the_floor():
    m = model()
    states = trajectory(m)
    peaks = [p for _, _, p in states]
    assert peaks == sorted(peaks, reverse=True)
    assert peaks[-1] == floor(m).needed_bytes
    assert states[0][:2] == (frozenset(), frozenset())


def test_prune_drops_unneeded_choices():
    m = model()
    plain_floor = minimax(m.n, m.segments(), lambda s: m.cost(s).needed_bytes)[0]
    sol = search(m, plain_floor - 1, method="dp")
    for v in sol.host:  # every placed value leaves its segment
        seg = next(s for s in sol.segments if s.start <= m.index[v] <= s.stop)
        assert m.rules.segment(seg.start, seg.stop).escapes(m.index[v])


def test_no_streamable_blocks_no_streaming():
    m = model(block_weights={})
    assert m.streamable == ()
    sol = search(m, 300 * MIB, method="dp")
    assert not sol.streamed


# -- plans ------------------------------------------------------------------------------------
def test_make_plan_carries_placement_streaming_and_depth():
    prof = profile()
    gpu = GPU
    m = CostModel(prof, gpu)
    plain = minimax(m.n, m.segments(), lambda s: m.cost(s).needed_bytes)[0]
    between = (plain + floor(m).needed_bytes) // 2  # below the plain floor, above everything streamed
    usable = int((gpu.cuda_context_bytes + prof.weight_bytes + between) / (1 - 0.02))
    plan = make_plan(prof, gpu, usable_bytes=usable, method="dp")
    comp = plan.components[0]
    assert comp.streamed or comp.host
    resident = prof.weight_bytes - sum(prof.block_weights[b] for b in comp.streamed)
    assert plan.prediction.weight_bytes == resident
    assert plan.prediction.peak_bytes <= usable
    assert plan.prediction.host_bytes >= sum(prof.block_weights[b] for b in comp.streamed)
    costs = [m.cost(s, frozenset(comp.host), frozenset(comp.streamed)) for s in segments_of(m, comp)]
    assert max(c.needed_bytes for c in costs) + resident + gpu.cuda_context_bytes + plan.prediction.margin_bytes \
        == plan.prediction.peak_bytes
    assert component_seconds(m, comp) == pytest.approx(plan.prediction.unet_call_s, abs=1e-6)


def test_make_plan_infeasible_names_the_floor():
    prof = profile()
    with pytest.raises(InfeasibleError, match=r"streamed.*set by .*mostly (slices and scratch|streamed weights|values)"):
        make_plan(prof, GPU, usable_bytes=GPU.cuda_context_bytes + 400 * MIB, method="dp")
    with pytest.raises(InfeasibleError, match="cannot be streamed"):
        make_plan(prof, GPU, usable_bytes=GPU.cuda_context_bytes + 50 * MIB, method="dp")


# -- shipped pipelines ---------------------------------------------------------------------------
# Fastest plans within a 2080 Ti's memory before #9 (recompute, placement, streaming, depth): the
# planner at commit 4063cee on the shipped profiles, predicted seconds for 25 steps.
BEFORE_2080TI = {
    "animatediff-512x512-f16-cfg-fp16-efficient": 35.59, "animatediff-512x512-f16-cfg-fp16-flash": 35.59,
    "animatediff-576x1024-f16-cfg-fp16-efficient": 88.06, "animatediff-576x1024-f16-cfg-fp16-flash": 88.06,
    "svd-512x512-f14-cfg-fp16-efficient": 37.7933, "svd-512x512-f14-cfg-fp16-flash": 37.7933,
    "svd-576x1024-f14-cfg-fp16-efficient": 91.8641, "svd-576x1024-f14-cfg-fp16-flash": 91.8641,
    "svd-xt-512x512-f25-cfg-fp16-efficient": 66.9523, "svd-xt-512x512-f25-cfg-fp16-flash": 66.9523,
    "svd-xt-576x1024-f25-cfg-fp16-efficient": 163.7336, "svd-xt-576x1024-f25-cfg-fp16-flash": 163.7336,
}


def _shipped(name):
    from vramplan.planner.plan import SHIPPED_DIR
    from vramplan.planner.schema import PipelineProfile
    from vramplan.profiles import read_json

    return PipelineProfile.model_validate(read_json(f"{SHIPPED_DIR}/{name}.pipeline.json"))


def test_every_shipped_pipeline_keeps_its_2080ti_plan():
    from vramplan.planner.pipeline import plan_pipeline
    from vramplan.planner.plan import shipped_profiles

    names = [n.removesuffix(".pipeline.json") for n in shipped_profiles() if not n.startswith("wan")]  # bf16: no 2080 Ti
    assert sorted(names) == sorted(BEFORE_2080TI)
    gpu = find_gpu("2080Ti")
    for name in names:
        plan = plan_pipeline(_shipped(name), gpu, method="dp")
        assert plan.prediction.latency_s == pytest.approx(BEFORE_2080TI[name], rel=0.02), name
        for comp in plan.components:  # it fits without: nothing placed or streamed
            assert not comp.host and not comp.streamed, name


def test_pipeline_below_the_plain_floor_places_streams_and_recomputes():
    from vramplan.planner.pipeline import plan_pipeline

    gpu = find_gpu("2080Ti")
    usable = int(3.5 * 2**30)
    plan = plan_pipeline(_shipped("svd-xt-576x1024-f25-cfg-fp16-efficient"), gpu, usable_bytes=usable, method="dp")
    assert plan.prediction.peak_bytes <= usable
    unet, vae = plan.component("unet"), plan.component("vae")
    assert unet.streamed and vae.host and vae.recompute
    weights = {c.component: c.weight_bytes for c in _shipped("svd-xt-576x1024-f25-cfg-fp16-efficient").components}
    denoise = next(s for s in plan.stages if s.stage == "denoise")
    assert denoise.streamed_bytes > 0 and denoise.weight_bytes <= weights["unet"] - denoise.streamed_bytes
    assert plan.prediction.host_bytes >= denoise.streamed_bytes
    assert plan.prediction.transfer_s > 0
    assert plan.prediction.latency_s > BEFORE_2080TI["svd-xt-576x1024-f25-cfg-fp16-efficient"]
    from vramplan.planner.schema import Plan

    assert Plan.from_json(plan.to_json()) == plan


def test_pipeline_floor_names_stage_unit_and_largest_part():
    from vramplan.planner.pipeline import plan_pipeline

    with pytest.raises(InfeasibleError, match=r"smallest reachable peak is \d+\.\d\d [MG]iB, set by the \w+ stage "
                                              r"\(.+\), with every .* streamed: .*the largest part is") as info:
        plan_pipeline(_shipped("svd-576x1024-f14-cfg-fp16-efficient"), find_gpu("2080Ti"), usable_bytes=2**29)
    assert info.value.stage and info.value.unit and info.value.reason
    assert info.value.part in info.value.reason


def test_required_streaming_is_kept():
    m = model()
    sol = search(m, 2000 * MIB, method="dp", min_streamed_bytes=350 * MIB)
    assert sol.streamed == {"b"}  # the largest block alone is enough; the plan alone needs none
    with pytest.raises(InfeasibleError, match="can be streamed"):
        search(m, 2000 * MIB, method="dp", min_streamed_bytes=950 * MIB)


@pytest.mark.parametrize("name", ["svd-576x1024-f14-cfg-fp16-efficient", "animatediff-576x1024-f16-cfg-fp16-efficient"])
def test_pipeline_floor_is_reachable(name):
    """Just above the floor a plan exists: SVD's VAE encode (unsliced) needs the decoder's blocks
    streamed though the decode stage alone would not."""
    from vramplan.planner.pipeline import plan_pipeline

    gpu = find_gpu("2080Ti")
    profile = _shipped(name)
    if name.startswith("svd-"):  # the frames decode: with the decode along rows SVD's floor is its fp32 VAE encode,
        profile = profile.model_copy(update={"alternatives": []})  # which plans with the VAE's weights whole (0.91
        # GiB reached, 0.79 GiB stated: the floor counts the decode's streamed blocks off the encode's weights)
    with pytest.raises(InfeasibleError) as info:
        plan_pipeline(profile, gpu, usable_bytes=2**29, method="dp")
    usable = int(info.value.min_peak_bytes * 1.03)
    plan = plan_pipeline(profile, gpu, usable_bytes=usable, method="dp")
    assert plan.prediction.peak_bytes <= usable


def test_pageable_fallback_predicts_a_slower_plan():
    from vramplan.planner.pipeline import plan_pipeline

    gpu, usable = find_gpu("2080Ti"), int(3.5 * 2**30)
    profile = _shipped("svd-xt-576x1024-f25-cfg-fp16-efficient")
    pinned = plan_pipeline(profile, gpu, usable_bytes=usable, method="dp")
    pageable = plan_pipeline(profile, gpu, usable_bytes=usable, method="dp", pinned=False)
    assert pageable.prediction.peak_bytes <= usable
    assert pageable.prediction.latency_s > pinned.prediction.latency_s


def test_search_ilp_equals_dp(monkeypatch):
    """CBC on every final solve (``UNIQUE_SKIPS_CBC`` off: a unique optimum is otherwise the DP's own path,
    planner/solve.py) gives the DP's placement and latency."""
    from vramplan.planner import solve as S

    monkeypatch.setattr(S, "UNIQUE_SKIPS_CBC", False)
    m = model()
    for budget in (450 * MIB, 250 * MIB, 0):
        dp, ilp = search(m, budget, method="dp"), search(m, budget, method="ilp")
        assert ilp.method.startswith("ILP") and (ilp.host, ilp.streamed) == (dp.host, dp.streamed)
        assert ilp.latency_s == pytest.approx(dp.latency_s, rel=1e-9)


def test_floor_names_weights_when_they_cannot_be_streamed():
    from vramplan.planner.pipeline import plan_pipeline

    profile = _shipped("animatediff-576x1024-f16-cfg-fp16-efficient")
    stages, alternatives = ([s.model_copy(update={"profile": s.profile.model_copy(update={"block_weights": {}})})
                             if s.profile is not None else s for s in found]
                            for found in (profile.stages, profile.alternatives))
    fixed = profile.model_copy(update={"stages": stages, "alternatives": alternatives})
    with pytest.raises(InfeasibleError, match=r"set by the denoise stage .* the largest part is weights that cannot "
                                              r"be streamed"):
        plan_pipeline(fixed, find_gpu("2080Ti"), usable_bytes=2**31, method="dp")
    # streamed finely (a res block, transformer or motion module at a time), the UNet no longer sets the
    # floor: the VAE decode's one-frame slices do, and with the decode along rows, the unsliced postprocess
    frames = profile.model_copy(update={"alternatives": []})
    with pytest.raises(InfeasibleError, match=r"set by the decode stage .* the largest part is slices and scratch"):
        plan_pipeline(frames, find_gpu("2080Ti"), usable_bytes=2**30, method="dp")
    with pytest.raises(InfeasibleError, match=r"set by the postprocess stage"):
        plan_pipeline(profile, find_gpu("2080Ti"), usable_bytes=2**29, method="dp")
