"""Fleet planning speed-ups give the numbers the plain computation gives: rows groups priced once per slice
shape, a segment's terms summed once per GPU, present blocks found by position, a fleet group's keys
planned once, and worker processes giving the plans this process gives."""

from __future__ import annotations

import random

import pytest
from vramplan.planner import capacity
from vramplan.planner import rows_cost as rc
from vramplan.planner.costs import CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.plan import shipped_pipeline_profile


def _stage(model: str, h: int, w: int, frames: int, dtype: str, stage: str):
    profile = shipped_pipeline_profile(model, h, w, frames, True, dtype, "flash")
    return next(s.profile for s in profile.stages if s.stage == stage)


def _rows_segments(m: CostModel):
    return [s for s in m.segments() if m.units[s.start].axis == "rows" and s.k > 1 and m.units[s.stop].axis_length > 1]


@pytest.mark.parametrize("model,h,w,frames,dtype,stage", [
    ("svd", 576, 1024, 14, "fp16", "encode_vae"),  # statistics units with recompute cones
    ("wan2.1-t2v-1.3b", 480, 832, 81, "bf16", "decode"),  # a unit that crops after every step
])
def test_rows_memory_skipping_repeated_slices_equals_every_slice(model, h, w, frames, dtype, stage, monkeypatch):
    m = CostModel(_stage(model, h, w, frames, dtype, stage), find_gpu("RTX 4090"))
    rng = random.Random(0)
    cases = []
    segments = _rows_segments(m)
    for seg in rng.sample(segments, min(len(segments), 24)):
        rel = sorted(m.relevant(seg))
        for host in [frozenset()] + ([frozenset(rng.sample(rel, rng.randint(1, len(rel))))] if rel else []):
            rules = m.rules_for(host)
            cases.append((seg, rules.segment(seg.start, seg.stop), m._entry(seg, host, rules)))
    assert cases
    fast = [rc.rows_memory(m, *c) for c in cases]
    counter = iter(range(10**9))
    monkeypatch.setattr(rc, "_signature", lambda *a: next(counter))  # every slice distinct: none skipped
    m.shared.__dict__.pop("_rows_geometry", None)  # the geometry (slices, signatures) is built again under it
    assert [rc.rows_memory(m, *c) for c in cases] == fast
    assert next(counter) > 0  # the slices were signed again (not read from a cached geometry)


def test_rows_segments_skip_slices():
    """The skipping does something: most slices of a many-slice rows group share their rows."""
    m = CostModel(_stage("svd", 576, 1024, 14, "fp16", "encode_vae"), find_gpu("RTX 4090"))
    seg = max(_rows_segments(m), key=lambda s: s.k)
    units = m.units[seg.start : seg.stop + 1]
    pos = {u.name: i for i, u in enumerate(units)}
    from vramplan.planner.rows import plan_segment

    slices = plan_segment(rc._maps(m)[seg.start : seg.stop + 1],
                          [[r for r in range(i + 1, len(units)) if u.name in units[r].inputs] for i, u in enumerate(units)],
                          [pos.get(u.inputs[0]) for u in units], [rc.in_rows(m, seg.start + i) for i in range(len(units))],
                          seg.k)
    sigs = {rc._signature(m, seg, rc._maps(m)[seg.start : seg.stop + 1], sl) for sl in slices}
    assert len(slices) >= 8 and len(sigs) <= len(slices) // 2


def test_segment_seconds_summed_once_equal_a_fresh_replay():
    """A segment's terms are summed once per GPU and reused for every placement: the same seconds as
    replaying its recipe with that placement's host-link bytes."""
    profile = _stage("svd", 576, 1024, 14, "fp16", "encode_vae")
    rng = random.Random(1)
    for gpu in ("RTX 4090", "T4"):
        m = CostModel(profile, find_gpu(gpu))
        for seg in rng.sample(m.segments(), 120):
            rel = sorted(m.relevant(seg))
            for host in [frozenset()] + [frozenset(rng.sample(rel, rng.randint(1, len(rel)))) for _ in range(2) if rel]:
                cost = m.cost(seg, host)
                rel_host = host & m.relevant(seg)
                if m.units[seg.start].axis == "rows" and seg.k > 1 and m.units[seg.stop].axis_length > 1:
                    _, terms, link, _ = m.shared.memory[("rows", seg, rel_host)]
                    expected = rc.replay(m, terms, link)
                else:
                    found = m.shared.memory[(seg, rel_host)]
                    expected = m._replay(found[6], found[7])
                assert (cost.seconds, cost.transfer_s) == expected


def test_present_blocks_are_those_a_scan_of_every_block_finds():
    m = CostModel(_stage("svd", 576, 1024, 14, "fp16", "denoise"), find_gpu("RTX 4090"))
    blocks = list(m.streamable)
    gathered = m.profile.block_gathered
    rng = random.Random(2)
    for _ in range(30):
        streamed = frozenset(rng.sample(blocks, rng.randint(1, len(blocks))))
        for seg in rng.sample(m.segments(), 40):
            touched, last = m._touched(seg.start, seg.stop)
            scan = [b for b in m.block_order if b in touched and b in streamed]
            scan += [b for b in m.block_order[last + 1 :] if b in streamed and b not in gathered][:1]
            assert m.present_blocks(seg, streamed) == scan


def _summary(plans: dict) -> dict:
    """Each plan as JSON without its solver's timing."""
    return {k: p.model_copy(update={"solver": p.solver.model_copy(update={"solve_seconds": 0.0})}).model_dump_json()
            for k, p in plans.items()}


def test_a_fleet_group_plans_each_key_once(monkeypatch):
    """Workloads of one shape and steps share their fastest plan (here no bounded plan: the bound is below
    it): it is made once, and equals the plan made alone."""
    capacity._PLANS.clear()
    calls = []
    plan_or_error = capacity._plan_or_error
    monkeypatch.setattr(capacity, "_plan_or_error", lambda key: calls.append(key) or plan_or_error(key))
    key = ("RTX 4090", "svd", 512, 512, None, True, "fp16", 25, None, None)
    done = dict(capacity._plan_pairs([(key, 1.0, 0.05), (key, 2.0, 0.05)]))
    assert calls == [key] and list(done) == [key]
    alone = plan_or_error(key)
    assert _summary(done) == _summary({key: alone})


def test_worker_processes_give_the_plans_this_process_gives(monkeypatch):
    groups = [[(("RTX 4090", "svd", 512, 512, None, True, "fp16", steps, None, None), 1.0, 0.05)]
              for steps in (20, 25)]
    capacity._PLANS.clear()
    monkeypatch.setattr(capacity, "PARALLEL_MIN_PLANS", 0)
    monkeypatch.setattr(capacity.os, "cpu_count", lambda: 2)
    capacity._plan_groups(groups)
    pooled = _summary(capacity._PLANS)
    capacity._PLANS.clear()
    monkeypatch.setattr(capacity, "PARALLEL_MIN_PLANS", 10**9)
    capacity._plan_groups(groups)
    assert len(capacity._PLANS) == 2 and pooled == _summary(capacity._PLANS)


def test_placed_values_a_segment_does_not_read_only_shift_its_states(monkeypatch):
    """A segment's memory with placed values it never reads (a UNet's skip connections) is its core
    placement's, every state lower by their bytes: the same as computing it with every placed value."""
    from vramplan.planner import costs as costs_module

    rng = random.Random(3)
    profile = _stage("svd", 512, 512, 14, "fp16", "denoise")
    cases = []
    for gpu in ("RTX 4090", "T4"):
        m = CostModel(profile, find_gpu(gpu))
        for seg in rng.sample(m.segments(), 150):
            extra = sorted(m.relevant(seg) - m._core(seg))
            if extra:
                core = sorted(m._core(seg) & m.relevant(seg))
                host = rng.sample(extra, rng.randint(1, len(extra))) + rng.sample(core, rng.randint(0, len(core)))
                cases.append((profile, gpu, seg, frozenset(host)))
    assert len(cases) > 50
    costs_module._SHARED.clear()
    shifted = _costs(cases)
    costs_module._SHARED.clear()
    monkeypatch.setattr(CostModel, "_core", lambda self, seg: self.relevant(seg))  # no shift: every value
    assert _costs(cases) == shifted
    costs_module._SHARED.clear()


def _costs(cases):
    return [CostModel(p, find_gpu(g)).cost(seg, host) for p, g, seg, host in cases]


def test_fastest_path_ilp_writes_the_file_pulp_writes():
    """The min-latency ILP bypasses PuLP's model (planner/ilp_mps.py): the MPS text must be PuLP's, byte for
    byte (variables sorted by PuLP's names, zero objective terms left out, duplicate segments once)."""
    import os
    import tempfile

    from vramplan.planner import solve as S
    from vramplan.planner.costs import Segment
    from vramplan.planner.ilp_mps import mps_min_latency

    rng = random.Random(1)
    for t in range(40):
        n = rng.randint(1, 12)
        segs = [Segment(a, b, k, rng.choice((1, 2))) for a in range(n) for b in range(a, min(n, a + 4))
                for k in (1, 2, 4, 16) if rng.random() < 0.5]
        segs += segs[:2]  # a duplicate: one variable
        if t % 2:
            rng.shuffle(segs)
        costs = {s: (rng.randint(0, 99), rng.choice((0.0, rng.random(), rng.random() * 1e-5, rng.random() * 1e3)))
                 for s in segs}
        if not any(c[1] for c in costs.values()):
            continue  # (PuLP adds a dummy variable; _ilp sends that case through PuLP)
        prob, _ = S._pulp_problem(segs, costs, n, None)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "p.mps")
            prob.writeMPS(path, rename=1)
            with open(path) as f:
                expected = f.read()
        assert mps_min_latency(segs, {s: c[1] for s, c in costs.items()}, n)[0] == expected


def test_fastest_path_ilp_without_pulp_chooses_what_pulp_chooses(monkeypatch):
    """Every CBC solve of a fastest plan on a shipped profile gives the same segments both ways."""
    from vramplan.planner import solve as S

    if not S._cbc_available():
        pytest.skip("CBC is not available")
    m = CostModel(_stage("svd", 512, 512, 14, "fp16", "denoise"), find_gpu("RTX 3060 12GB"))
    segs, needed, seconds = S.table(m)
    problems = []
    for cap in sorted(set(needed))[:: max(1, len(set(needed)) // 3)][1:]:
        fitting = [i for i, b in enumerate(needed) if b <= cap]
        problems.append(([segs[i] for i in fitting], {segs[i]: (needed[i], seconds[i]) for i in fitting}, m.n, None))
    problems.append(([segs[0]], {segs[0]: (needed[0], seconds[0])}, m.n, None))  # no path: infeasible both ways
    fast = [S._ilp(*p) for p in problems]
    monkeypatch.setattr(S, "FAST_MPS", False)
    assert fast == [S._ilp(*p) for p in problems]
    assert any(f[0] is not None for f in fast) and fast[-1][0] is None


def test_a_unique_fastest_path_is_what_cbc_returns(monkeypatch):
    """A fastest-path ILP whose optimum beats every other path by more than UNIQUE_MARGIN is answered by the
    DP's path without CBC: at caps over a shipped table, each such solve gives the segments CBC gives; the
    others (exact ties) still go to CBC. The second-best bound is checked against brute force below."""
    from vramplan.planner import solve as S

    if not S._cbc_available():
        pytest.skip("CBC is not available")
    m = CostModel(_stage("svd", 512, 512, 14, "fp16", "denoise"), find_gpu("RTX 3060 12GB"))
    _, needed, _ = S.table(m)
    low, top = S.memory_minimax(m, frozenset(), frozenset(), 8)[0], max(needed)
    caps = [int(low + q * (top - low)) for q in (0, 0.01, 0.03, 0.1, 0.3, 1)]
    skipped = [S.solve(m, cap, None, "ilp") for cap in caps]
    monkeypatch.setattr(S, "UNIQUE_SKIPS_CBC", False)
    solved = [S.solve(m, cap, None, "ilp") for cap in caps]
    assert any(a.method == S.UNIQUE_METHOD for a in skipped)
    for a, b in zip(skipped, solved, strict=True):
        assert a.segments == b.segments and a.latency_s == b.latency_s
        assert a.method == (S.UNIQUE_METHOD if a.method != b.method else b.method)


def test_unique_fastest_path_against_brute_force():
    """_unique on handmade tables: True exactly when every other tiling of the units is slower by more than
    the margin (all paths enumerated)."""
    from vramplan.planner import solve as S
    from vramplan.planner.costs import Segment

    class Table:  # what _fastest / both_ways / _bounds read of a cost model
        def __init__(self, n, segs):
            self.n, self._segs, self.__dict__["_x"] = n, segs, None

        def segments(self, max_group=8):
            return self._segs

    rng = random.Random(3)
    checked = 0
    for _ in range(200):
        n = rng.randint(1, 6)
        segs = sorted({Segment(a, b, k) for a in range(n) for b in range(a, n) for k in (1, 2) if rng.random() < 0.6},
                      key=lambda s: (s.start, s.stop, s.k))
        seconds = [rng.choice((1.0, 2.0, 0.5, 1.5)) for _ in segs]
        needed = [rng.randint(0, 3) for _ in segs]
        m = Table(n, segs)
        cap = 2
        fastest = S._fastest(m, 8, needed, cap, seconds)
        if fastest is None:
            continue

        totals = sorted(_tilings(0, n, segs, seconds, needed, cap))
        unique = len(totals) == 1 or totals[1] > totals[0] * (1 + S.UNIQUE_MARGIN) + 1e-12
        assert S._unique(m, 8, needed, cap, seconds, fastest) == unique
        checked += 1
    assert checked > 50


def _tilings(at, n, segs, seconds, needed, cap) -> list[float]:
    """Seconds of every tiling of units ``at``..``n - 1`` by fitting candidates (brute force)."""
    if at == n:
        return [0.0]
    return [seconds[i] + rest for i, s in enumerate(segs) if s.start == at and needed[i] <= cap
            for rest in _tilings(s.stop + 1, n, segs, seconds, needed, cap)]


def _decode_rows():
    """AnimateDiff 576x1024's rows decode (the stage alternative) on the 2080 Ti profile: a rows stage
    whose pruning un-places many values."""
    from vramplan.planner.alternatives import variants

    profile = shipped_pipeline_profile("animatediff", 576, 1024, 16, True, "fp16", "efficient")
    stage = next(s for s in variants(profile)[1][1].stages if s.stage == "decode")
    return CostModel(stage.profile, find_gpu("RTX 2080 Ti"))


def test_an_unplacement_rejected_unsolved_is_one_the_re_solve_rejects():
    """_slower_unplaced (the pruning's un-placements decided while costing few candidates) says True only
    where the re-solve finds no plan or a slower one than the pruning accepts; and term_seconds bounds
    every candidate's seconds under the placements tried. Random placements on a rows decode and a UNet."""
    from vramplan.planner import placement as P
    from vramplan.planner.solve import solve

    rng = random.Random(5)
    rejected = 0
    unet = CostModel(_stage("svd", 512, 512, 14, "fp16", "denoise"), find_gpu("RTX 3060 12GB"))
    for m, placements in ((_decode_rows(), 1), (unet, 2)):
        low, high = P.floor(m).needed_bytes, max(capacity_table(m))
        budget = low + (high - low) // 30
        for _ in range(placements):
            host = frozenset(rng.sample(m.placeable, min(len(m.placeable), rng.randint(4, 12))))
            solution = solve(m, budget, None, "dp", host=host, streamed=frozenset(m.streamable), explain=False)
            if solution is None:
                continue
            for v in rng.sample(sorted(host), min(3, len(host))):
                trial = host - {v}
                says = P._slower_unplaced(m, solution, trial, budget, 8)
                ref = solve(m, budget, None, "dp", host=trial, streamed=solution.streamed, explain=False)
                slower = ref is None or ref.latency_s > solution.latency_s * (1 + 1e-9)
                assert not says or slower
                rejected += says
                for s in rng.sample(m.segments(), 10):
                    assert m.cost(s, trial).seconds >= m.term_seconds(s)
    assert rejected


def capacity_table(m: CostModel) -> list[int]:
    from vramplan.planner.solve import table

    return table(m)[1]


def test_a_pruning_with_unplacements_rejected_unsolved_is_the_plain_pruning(monkeypatch):
    """A UNet's whole search near its floor (a pruning from many placed values), with and without the lazy
    un-placements: the same solution, and some un-placements were rejected unsolved."""
    from vramplan.planner import placement as P

    def unet():
        return CostModel(_stage("svd", 512, 512, 14, "fp16", "denoise"), find_gpu("RTX 3060 12GB"))

    m = unet()
    low = P.floor(m).needed_bytes
    budget = low + (max(capacity_table(m)) - low) // 20
    said = []
    real = P._slower_unplaced
    monkeypatch.setattr(P, "_slower_unplaced", lambda *a: said.append(real(*a)) or said[-1])
    lazy = P.search(m, budget, method="dp")
    monkeypatch.setattr(P, "LAZY_UNPLACE", False)
    plain = P.search(unet(), budget, method="dp")
    assert (lazy.segments, lazy.host, lazy.streamed, lazy.latency_s) == (plain.segments, plain.host, plain.streamed,
                                                                        plain.latency_s)
    assert any(said)
