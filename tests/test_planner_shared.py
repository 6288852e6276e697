"""Planning fast without changing a plan: what does not depend on the GPU is computed once per profile.

Memory of a segment (and the recipe of its seconds) is shared by every cost model of the same profile
(``costs.Shared``); each GPU replays the recipe at its own rates. These tests compare everything a
shared store gives with a cost model that starts from an empty one, number for number.
"""

from __future__ import annotations

import itertools

import pytest
from vramplan.planner import costs
from vramplan.planner.costs import EMPTY, CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.placement import _adjusted, _memory_candidates, floor, trajectory
from vramplan.planner.plan import shipped_pipeline_profile
from vramplan.planner.solve import memory_minimax, memory_table, minimax


def _stages():
    profile = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", "flash")
    return {s.stage: s.profile for s in profile.stages if s.profile is not None}


def _fresh(profile, gpu, **kwargs) -> CostModel:
    costs._SHARED.clear()
    return CostModel(profile, gpu, **kwargs)


def _placements(model: CostModel) -> list[frozenset[str]]:
    placeable = sorted(model.placeable, key=lambda v: -model.size[v])
    return [EMPTY, frozenset(placeable[:1]), frozenset(placeable[:3]), frozenset(placeable[::2])]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_second_gpu_gets_the_same_costs_as_from_scratch(stage):
    profile = list(_stages().values())[stage]
    first = _fresh(profile, find_gpu("RTX 4090"))
    segs = first.segments()[::5]
    for seg, host in itertools.product(segs, _placements(first)):
        first.cost(seg, host)  # fills the shared store
    for name, pinned in (("T4", True), ("RTX 3050 Laptop", False)):
        shared = CostModel(profile, find_gpu(name), pinned=pinned)
        assert shared.shared is first.shared
        alone = CostModel(profile, find_gpu(name), pinned=pinned)
        alone.shared = costs.Shared()  # nothing shared
        for seg, host in itertools.product(segs, _placements(first)):
            assert shared.cost(seg, host) == alone.cost(seg, host), (name, seg, host)
            assert shared.needed(seg, host) == alone.cost(seg, host).needed_bytes


def test_rows_groups_are_shared_too():
    decode = next(p for p in _stages().values() if any(u.axis == "rows" for u in p.units))  # SVD's VAE encode
    a = _fresh(decode, find_gpu("RTX 4090"))
    rows = [s for s in a.segments() if a.units[s.start].axis == "rows" and s.k > 1 and s.stop > s.start]
    assert rows
    for seg in rows[:20]:
        a.cost(seg)
    b = CostModel(decode, find_gpu("GTX 1080 Ti"))
    alone = CostModel(decode, find_gpu("GTX 1080 Ti"))
    alone.shared = costs.Shared()
    for seg in rows[:20]:
        assert b.cost(seg) == alone.cost(seg)
        assert b.cost(seg).seconds != a.cost(seg).seconds  # priced at each GPU's rates


def test_memory_minimax_is_minimax_over_the_memory_candidates():
    unet = _stages()["denoise"]
    model = _fresh(unet, find_gpu("RTX 3060 12GB"))
    blocks = list(model.streamable)
    for host, streamed in itertools.product(_placements(model), [EMPTY, frozenset(blocks[:2]), frozenset(blocks)]):
        expected = minimax(model.n, _memory_candidates(model, 8), _adjusted(model, host, streamed))
        assert memory_minimax(model, host, streamed) == expected


def test_memory_tables_derived_from_any_kept_placement_equal_fresh_ones():
    unet = _stages()["denoise"]
    model = _fresh(unet, find_gpu("RTX 4090"))
    placements = _placements(model)
    for host in placements:  # each derived from the closest kept one
        memory_table(model, host)
    for host in placements:
        other = CostModel(unet, find_gpu("RTX 4090"))
        other.shared = costs.Shared()
        assert memory_table(model, host) == memory_table(other, host)


def test_floors_and_trajectories_are_the_same_with_a_shared_store():
    unet = _stages()["denoise"]
    first = _fresh(unet, find_gpu("RTX 4090"))
    trajectory(first)
    again = CostModel(unet, find_gpu("T4"))
    alone = CostModel(unet, find_gpu("T4"))
    alone.shared = costs.Shared()
    assert floor(again) == floor(alone)
    assert trajectory(again) == trajectory(alone)
