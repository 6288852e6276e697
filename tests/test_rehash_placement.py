"""Step Rehash priced with placement, weight streaming, depth and pageable host memory (no torch).

At small budgets the rehash plan places values on host and streams blocks. Its key calls and reuse
calls are recomputed here from the cost model alone: segments with the plan's placement, and the
streamed blocks' copies that compute does not hide, simulated per call (a reuse call copies in only
the blocks its program touches)."""

from __future__ import annotations

import pytest
from vramplan.planner.costs import CostModel, Segment
from vramplan.planner.errors import VramplanError
from vramplan.planner.gpus import find_gpu
from vramplan.planner.pipeline import PipelinePlanner
from vramplan.planner.plan import segments_of, shipped_pipeline_profile
from vramplan.planner.rehash import (
    CutCostModel,
    StageRehash,
    profile_nodes,
    reuse_names,
    reuse_seconds,
    reuse_segments,
    split_at_cut,
)

from vramplan import plan_for

GPU = "2080Ti"


@pytest.fixture(scope="module")
def svd():
    return shipped_pipeline_profile("svd", 576, 1024, 14, True, "fp16", "flash")


# Budgets tried, largest first, for a plan that places values on host as well as streaming (with finer
# streaming blocks the UNet needs host placement only nearer its floor).
HOST_BUDGETS = (2.5, 2.25, 2.0, 1.8, 1.7, 1.65, 1.6)


@pytest.fixture(scope="module")
def host_gb():
    """The largest of HOST_BUDGETS whose rehash plan places values on host."""
    for vram_gb in HOST_BUDGETS:
        try:
            plan = plan_for(gpu=GPU, model="svd", vram_gb=vram_gb, rehash="uniform", keys=13)
        except VramplanError:
            continue
        if plan.component("unet").host:
            return vram_gb
    pytest.fail("no budget of HOST_BUDGETS gives a plan with host values")


def _unet(profile):
    return next(s.profile for s in profile.stages if s.profile is not None and s.per_step)


def _exposed(model: CostModel, units: list[int], streamed: frozenset[str]) -> float:
    """Seconds a call running ``units`` waits for streamed weights: blocks copied in their order of
    first use on one copy stream, each issued when compute reaches the previous one (the first at the
    call's start), needed at its own first unit."""
    first: dict[str, float] = {}
    clock = 0.0
    for i in units:
        first.setdefault(model.unit_blocks[i], clock)  # its streaming block (finer where the adapter says)
        clock += model.unit_seconds[i]
    blocks = [b for b in first if b in streamed]
    stall = copy_free = 0.0
    for n, b in enumerate(blocks):
        issue = first[blocks[n - 1]] + stall if n else 0.0
        copy_free = max(issue, copy_free) + model.profile.block_weights[b] / model.link_bytes_per_s
        need = first[b] + stall
        stall += max(0.0, copy_free - need)
    return stall


def _runs(segments, keep):
    """Each run of consecutive ``keep`` units of each segment, slice count and depth kept."""
    out = []
    for seg in segments:
        run = [i for i in range(seg.start, seg.stop + 1) if i in keep]
        while run:
            n = 1
            while n < len(run) and run[n] == run[n - 1] + 1:
                n += 1
            out.append(Segment(run[0], run[n - 1], seg.k, seg.depth))
            run = run[n:]
    return out


def _calls(plan, svd, pinned=True):
    """(full, reuse) seconds of one UNet call of ``plan``, recomputed from CostModel costs."""
    unet = _unet(svd)
    model = CostModel(unet, find_gpu(GPU), pinned=pinned)
    comp = plan.component("unet")
    host, streamed = frozenset(comp.host), frozenset(comp.streamed)
    segments = segments_of(model, comp)
    full = sum(model.cost(s, host, streamed).seconds for s in segments) + _exposed(model, range(model.n), streamed)
    keep = {model.index[n] for n in reuse_names(profile_nodes(unet.units), unet.result, plan.rehash.cut)}
    reuse = (sum(model.cost(s, host, streamed).seconds for s in _runs(segments, keep))
             + _exposed(model, sorted(keep), streamed))
    return full, reuse


def _residency_s(plan, svd) -> float:
    """Moving the UNet's weights (less the streamed ones) in and out once, when it is not resident."""
    comp = plan.component("unet")
    if comp.resident:
        return 0.0
    unet = _unet(svd)
    weights = next(c.weight_bytes for c in svd.components if c.component == "unet")
    streamed = sum(unet.block_weights[b] for b in comp.streamed)
    return 2 * (weights - streamed) / (find_gpu(GPU).pcie_gbps * 1e9)


def test_split_and_reuse_runs_keep_depth():
    segs = [Segment(0, 0, 1), Segment(1, 6, 4, 2)]
    assert split_at_cut(segs, 3) == [Segment(0, 0, 1), Segment(1, 3, 4, 2), Segment(4, 6, 4, 2)]
    assert split_at_cut(segs, 6) == segs


def test_constrained_model_keeps_pinned(svd):
    unet = _unet(svd)
    gpu = find_gpu(GPU)
    cut = "up_blocks.3.attentions.1.proj_out"
    for pinned in (True, False):
        model = StageRehash(cut, 13, 25).constrain(CostModel(unet, gpu, pinned=pinned))
        assert isinstance(model, CutCostModel) and model.pinned is pinned
        assert model.link_bytes_per_s == CostModel(unet, gpu, pinned=pinned).link_bytes_per_s


@pytest.mark.parametrize("placed", [False, True])
def test_rehash_plan_prices_its_placement(svd, placed, request):
    """keys x full + rest x reuse, each call with the plan's host values, streamed blocks and depth."""
    vram_gb = request.getfixturevalue("host_gb") if placed else 3.0
    plan = plan_for(gpu=GPU, model="svd", vram_gb=vram_gb, rehash="uniform", keys=13)
    comp, r = plan.component("unet"), plan.rehash
    assert comp.streamed and len(r.key_steps) == 13
    if placed:
        assert comp.host
    assert any(g.depth > 1 for g in comp.groups) or placed
    full, reuse = _calls(plan, svd)
    assert r.key_call_s == pytest.approx(full, abs=2e-6)
    assert r.reuse_call_s == pytest.approx(reuse, abs=2e-6)
    denoise = next(s for s in plan.stages if s.stage == "denoise")
    assert denoise.seconds == pytest.approx(13 * full + 12 * reuse + _residency_s(plan, svd), abs=2e-4)
    assert plan.prediction.latency_s == pytest.approx(sum(s.seconds for s in plan.stages), abs=1e-3)
    # the reuse call copies in the streamed blocks its program touches, and waits for some of it
    unet = _unet(svd)
    model = CutCostModel(unet, find_gpu(GPU), "expandable_segments", r.cut)
    segments = segments_of(model, comp)
    no_stream = reuse_seconds(model, segments, r.cut, comp.host)
    assert reuse > no_stream
    keep = {model.index[n] for n in reuse_names(profile_nodes(unet.units), unet.result, r.cut)}
    assert reuse_segments(model, segments, r.cut) == _runs(segments, keep)


def test_pageable_rehash_plan_is_slower(svd):
    pinned = plan_for(gpu=GPU, model="svd", vram_gb=3.0, rehash="uniform", keys=13)
    pageable = plan_for(gpu=GPU, model="svd", vram_gb=3.0, rehash="uniform", keys=13, pinned=False)
    assert pageable.component("unet").streamed
    assert pageable.prediction.latency_s > pinned.prediction.latency_s
    assert pageable.rehash.key_call_s > pinned.rehash.key_call_s
    full, reuse = _calls(pageable, svd, pinned=False)
    assert pageable.rehash.key_call_s == pytest.approx(full, abs=2e-6)
    assert pageable.rehash.reuse_call_s == pytest.approx(reuse, abs=2e-6)


def test_pageable_changes_nothing_when_nothing_moves(svd):
    """On a GPU where the plan neither places nor streams, pageable memory costs nothing."""
    pinned = plan_for(gpu="4090", model="svd", rehash="uniform", keys=13)
    pageable = plan_for(gpu="4090", model="svd", rehash="uniform", keys=13, pinned=False)
    comp = pinned.component("unet")
    assert not comp.host and not comp.streamed
    assert pageable.rehash == pinned.rehash
    assert pageable.prediction.latency_s == pinned.prediction.latency_s


def test_stage_transfer_counts_reuse_calls(svd, host_gb):
    """What the denoising stage waits on the host link: keys x a full call's + rest x a reuse call's."""
    gpu = find_gpu(GPU)
    usable = int(host_gb * 2**30)
    plan = plan_for(gpu=GPU, model="svd", vram_gb=host_gb, rehash="uniform", keys=13)
    choice = StageRehash(plan.rehash.cut, 13, 25)
    planner = PipelinePlanner(svd, gpu, usable, 25, "expandable_segments", choice)
    resident = {c.component: c.resident for c in plan.components}
    sol = next(r.solution for r in planner.evaluate(resident, usable) if r.stage.per_step)
    model = planner.models["denoise"]
    runs = reuse_segments(model, sol.segments, choice.cut)
    reuse = sum(model.cost(s, sol.host, sol.streamed).transfer_s for s in runs)
    keep = sorted({model.index[n] for n in reuse_names(profile_nodes(model.units), model.profile.result, choice.cut)})
    reuse += _exposed(model, keep, sol.streamed)
    assert sol.host and 0 < reuse < sol.transfer_s
    assert choice.transfer_s(model, sol) == pytest.approx(13 * sol.transfer_s + 12 * reuse)
    assert choice.transfer_s(model, sol) < 25 * sol.transfer_s
