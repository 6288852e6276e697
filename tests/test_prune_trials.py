"""The pruning's trials that drop a streamed block are decided without a re-solve where that is exact
(planner.placement._without_block): the path kept when it still fits, a lower bound that rejects the
trial otherwise; an un-placement that leaves some unit without a fitting candidate is rejected unsolved
(planner.placement._no_room). Checked against the re-solve it stands for, trial by trial, and whole prunings and
searches against the one-solve-per-trial pruning they replace, on shipped profiles (fine UNet blocks;
Wan's UMT5 with its gathered embedding table). No torch."""

from __future__ import annotations

import random

import pytest
from vramplan.planner import placement
from vramplan.planner.costs import CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.placement import _RESOLVE, _From, _no_room, _without_block, floor, prune, search
from vramplan.planner.plan import shipped_pipeline_profile
from vramplan.planner.solve import solve, table


def _stage(model: str, h: int, w: int, frames: int, dtype: str, kernel: str, stage: str, gpu: str) -> CostModel:
    prof = shipped_pipeline_profile(model, h, w, frames, True, dtype, kernel)
    return CostModel(next(s for s in prof.stages if s.stage == stage).profile, find_gpu(gpu))


@pytest.fixture(scope="module")
def unet() -> CostModel:
    return _stage("svd", 512, 512, 14, "fp16", "flash", "denoise", "RTX 3050 Laptop")


@pytest.fixture(scope="module")
def umt5() -> CostModel:
    model = _stage("wan2.1-t2v-1.3b", 480, 832, 81, "bf16", "flash", "encode_text", "RTX 4060 Laptop")
    assert model.profile.block_gathered  # the embedding table: present by its gathered rows, never prefetched
    return model


def _budgets(model: CostModel, count: int) -> list[int]:
    """From the floor to the plain plan's peak: the range where the search places and streams."""
    low = floor(model).needed_bytes
    high = max(table(model)[1])
    return [low + (high - low) * i // (count + 1) for i in range(1, count + 1)]


def _check_trials(model: CostModel, seed: int, budgets: list[int]) -> dict[str, int]:
    """Every block dropped from random placements and streamed sets (every block, or three in four)."""
    rng = random.Random(seed)
    seen = {"kept path": 0, "rejected": 0, "re-solved": 0}
    for budget, drop in [(b, d) for b in budgets for d in (0, len(model.streamable) // 4)]:
        host = frozenset(rng.sample(model.placeable, rng.randint(0, min(3, len(model.placeable)))))
        streamed = frozenset(model.streamable) - frozenset(rng.sample(model.streamable, drop))
        solution = solve(model, budget, None, "dp", host=host, streamed=streamed, explain=False)
        if solution is None:
            continue
        start = _From(model, solution, budget, 8)
        for block in sorted(streamed):
            got = _without_block(model, start, block, budget, 8)
            ref = solve(model, budget, None, "dp", host=host, streamed=streamed - {block}, explain=False)
            if got is _RESOLVE:
                seen["re-solved"] += 1
            elif got is None:  # the re-solve finds nothing, or nothing the pruning would take
                seen["rejected"] += 1
                assert ref is None or ref.latency_s > solution.latency_s * (1 + 1e-9)
            else:
                seen["kept path"] += 1
                assert ref is not None
                assert got.segments == ref.segments and got.streamed == ref.streamed
                assert got.latency_s == ref.latency_s and got.needed_bytes == ref.needed_bytes
                assert (got.stream_transfer_s, got.streamed_weight_bytes) == (ref.stream_transfer_s,
                                                                              ref.streamed_weight_bytes)
                assert list(got.costs) == list(ref.costs)
    return seen


def test_a_trial_decided_without_a_solve_is_what_the_solve_gives(unet):
    seen = _check_trials(unet, 0, _budgets(unet, 4))
    assert seen["kept path"] and seen["rejected"], seen  # both shortcuts exercised


def test_gathered_table_trials_agree_too(umt5):
    low = floor(umt5).needed_bytes
    seen = _check_trials(umt5, 1, [low + i * 2**26 for i in range(4)])  # near the floor: every block streamed
    assert seen["kept path"] and seen["rejected"], seen


def _resolving(monkeypatch):
    """The pruning as it was: one solve per trial."""
    monkeypatch.setattr(placement, "_without_block", lambda *a: _RESOLVE)


@pytest.mark.parametrize("which", ["unet", "umt5"])
def test_search_is_the_one_solve_per_trial_search(which, request, monkeypatch):
    model = request.getfixturevalue(which)
    budgets = _budgets(model, 5)
    fast = [search(model, b, method="dp") for b in budgets]
    fresh = CostModel(model.profile, model.gpu)
    _resolving(monkeypatch)
    slow = [search(fresh, b, method="dp") for b in budgets]
    assert any(s.streamed for s in fast)
    for a, b in zip(fast, slow, strict=True):
        assert (a.host, a.streamed, a.segments, a.latency_s, a.needed_bytes) == (
            b.host, b.streamed, b.segments, b.latency_s, b.needed_bytes)


def test_prune_from_everything_streamed_is_the_one_solve_per_trial_prune(unet, monkeypatch):
    """The more-streaming pass prunes from every block streamed: most trials are rejected by the bound."""
    budget = _budgets(unet, 3)[1]
    everything = frozenset(unet.streamable)
    start = solve(unet, budget, None, "dp", streamed=everything)
    fast = prune(unet, start, budget, None)
    _resolving(monkeypatch)
    slow = prune(unet, start, budget, None)
    assert fast.streamed < everything
    assert (fast.host, fast.streamed, fast.segments, fast.latency_s) == (
        slow.host, slow.streamed, slow.segments, slow.latency_s)


def test_no_room_only_where_the_re_solve_finds_nothing(unet):
    seen = {"no room": 0, "solved": 0}
    for budget in [floor(unet).needed_bytes + i * 2**24 for i in range(1, 4)]:
        host, streamed, _ = placement._first_fitting(unet, 8, frozenset(), budget)  # the search's first state
        solution = solve(unet, budget, None, "dp", host=host, streamed=streamed)
        for v in sorted(solution.host):
            ref = solve(unet, budget, None, "dp", host=solution.host - {v}, streamed=streamed, explain=False)
            if _no_room(unet, solution, solution.host - {v}, budget, 8):
                seen["no room"] += 1
                assert ref is None
            else:
                seen["solved"] += 1
    assert seen["no room"] and seen["solved"], seen
