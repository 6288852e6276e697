"""rows_cost.rows_memory precomputes per (segment, k) what does not depend on the placement; it must give
exactly what pricing every placement afresh gives. The oracle is rows_memory as it was before that
(commit 0d12e8a), kept here verbatim: every slice's rows planned and every row map walked per call."""

from __future__ import annotations

import random

import pytest
from vramplan.planner import rows_cost as rc
from vramplan.planner.alternatives import variants
from vramplan.planner.costs import CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.plan import shipped_pipeline_profile
from vramplan.planner.rows import plan_segment


def reference_rows_memory(model, seg, seg_rules, entry: int) -> tuple[tuple[int, int, int, int, int], tuple, float, tuple]:
    """What of a rows segment's cost does not depend on the GPU: ``(activation, live, transient, peak
    unit, needed)`` and the :func:`recipe` of its seconds ``(terms, link bytes, recompute)``."""
    units = model.units[seg.start : seg.stop + 1]
    maps = rc._maps(model)[seg.start : seg.stop + 1]
    pos = {u.name: i for i, u in enumerate(units)}
    first = [pos.get(u.inputs[0]) for u in units]
    in_lens = [rc.in_rows(model, seg.start + i) for i in range(len(units))]
    readers = [[r for r in range(i + 1, len(units)) if u.name in units[r].inputs] for i, u in enumerate(units)]
    slices = plan_segment(maps, readers, first, in_lens, seg.k)
    size = model.size
    lens = [u.output_shape[-2] or 1 for u in units]
    kinds = seg_rules.buffers(lambda j, name: False)  # rows never write over an input (halos are read later)
    buffer = [u.output_bytes if kind == "new" else 0 for u, kind in zip(units, kinds, strict=True)]

    def made_rows(i: int, sl) -> int:
        """Rows unit ``i`` produces on its slab (the halo included) before it is cropped."""
        a, b = sl.slab[i]
        return maps[i].out_len(b - a) if b > a else 0

    sigs = [rc._signature(model, seg, maps, sl) for sl in slices]
    held_at = [[h - seg.start for h in seg_rules.held_at(seg.start + i)] for i in range(len(units))]
    # A unit that stages its input itself (``stage_inside``: the Wan decode's up levels) copies each frame
    # of its slab to the device whether that input is on host or not: the copy is in its profiled scratch.
    staged_at = [[] if getattr(units[i], "stage_inside", False) else [size[v] for v in seg_rules.staged(seg.start + i)]
                 for i in range(len(units))]
    cropped = [rc._cropped(model, seg.start + i) for i in range(len(units))]
    best = None
    seen = set()
    for n, sl in enumerate(slices):
        if n:  # a later slice with the rows of an earlier later one (most interior slices): the same states
            if sigs[n] in seen:
                continue
            seen.add(sigs[n])
        for i in range(len(units)):
            j = seg.start + i
            if sl.out[i][1] <= sl.out[i][0]:
                continue
            # The executor allocates an escaping output's full buffer at its first write, after the unit's
            # first slice is computed: during that slice only earlier units' buffers are alive.
            live = entry + (sum(buffer) if n else sum(buffer[:i]))
            # a cropping unit holds only the rows its readers need (its slice's own), not its whole slab
            held = sum(units[h].output_bytes * ((sl.out[h][1] - sl.out[h][0]) if cropped[h] else made_rows(h, sl))
                       // lens[h] for h in held_at[i])
            a, b = sl.slab[i]
            staged = sum(nbytes * (b - a) // max(1, in_lens[i]) for nbytes in staged_at[i])
            scratch = int(rc._slab_scratch(model, j, rc._held(model, j, sl, i) if cropped[i] else b - a))
            transient = held + staged + scratch
            if best is None or live + transient > best[0]:
                best = (live + transient, live, transient, j)
            if not n and buffer[i]:  # that first write: the new buffer and the slice's piece, both alive
                s, e = sl.out[i]
                piece = units[i].output_bytes * ((e - s) if rc._cropped(model, j) else made_rows(i, sl)) // lens[i]
                live = entry + sum(buffer[: i + 1])
                if live + held + piece > best[0]:
                    best = (live + held + piece, live, held + piece, j)
    # Statistics passes run before the slice loop (no buffers yet): a recomputed input's cone, slice by
    # slice, holding the cone's slabs its later units read, then the input's own rows (and their copy
    # for the grouped moments).
    for i, unit in enumerate(units):
        j = seg.start + i
        cone = [c - seg.start for c in seg_rules.cone(j)] if unit.needs_input_stats and i else []
        seen = set()
        for m, sl in enumerate(slices if cone else ()):
            if sigs[m] in seen:  # the rows of an earlier slice: the same states
                continue
            seen.add(sigs[m])
            for n, c in enumerate(cone):
                if sl.out[c][1] <= sl.out[c][0]:
                    continue
                held = sum(units[u].output_bytes * made_rows(u, sl) // lens[u] for u in cone[:n]
                           if any(units[u].name in units[v].inputs for v in cone[n:]))
                a, b = sl.slab[c]
                rows = rc._held(model, seg.start + c, sl, c) if rc._cropped(model, seg.start + c) else b - a
                transient = held + int(rc._slab_scratch(model, seg.start + c, rows))
                if entry + transient > best[0]:
                    best = (entry + transient, entry, transient, j)
            last = cone[-1]
            own = sl.own[last][1] - sl.own[last][0]
            transient = units[last].output_bytes * (made_rows(last, sl) + own) // lens[last]
            if entry + transient > best[0]:
                best = (entry + transient, entry, transient, j)
    act, live, transient, peak = best
    terms, link, recompute = rc.recipe(model, seg, seg_rules, slices, units, lens, made_rows)
    return (act, live, transient, peak, int(act * model.allocator_factor(seg.k))), terms, link, recompute


def _stage(model: str, h: int, w: int, frames: int, dtype: str, stage: str, kernel: str = "flash"):
    """A stage of a shipped profile; its rows-sliced alternative where the pipeline has one (the VAE
    decoded along rows)."""
    profile = shipped_pipeline_profile(model, h, w, frames, True, dtype, kernel)
    for name, alternative in variants(profile):
        if "rows" in str(name):
            profile = alternative
    return next(s.profile for s in profile.stages if s.stage == stage)


@pytest.mark.parametrize("model,h,w,frames,dtype,stage,kernel", [
    ("animatediff", 576, 1024, 16, "fp16", "decode", "efficient"),  # the slow --max-latency search's stage
    ("svd", 576, 1024, 14, "fp16", "encode_vae", "flash"),  # statistics units with recompute cones
    ("wan2.1-t2v-1.3b", 480, 832, 81, "bf16", "decode", "flash"),  # units that crop after every step
])
def test_rows_memory_equals_the_reference_on_random_placements(model, h, w, frames, dtype, stage, kernel):
    m = CostModel(_stage(model, h, w, frames, dtype, stage, kernel), find_gpu("RTX 2080 Ti"))
    rng = random.Random(1)
    segments = [s for s in m.segments() if m.units[s.start].axis == "rows" and s.k > 1
                and m.units[s.stop].axis_length > 1]
    assert segments
    checked = 0
    for seg in rng.sample(segments, min(len(segments), 20)):
        rel = sorted(m.relevant(seg))
        placements = [frozenset()] + [frozenset(rng.sample(rel, rng.randint(1, len(rel)))) for _ in range(3) if rel]
        for host in placements:
            rules = m.rules_for(host)
            args = (seg, rules.segment(seg.start, seg.stop), m._entry(seg, host, rules))
            fast = rc.rows_memory(m, *args)
            assert fast == reference_rows_memory(m, *args), (seg, sorted(host))
            assert rc.rows_memory(m, *args) == fast  # again, from the kept geometry
            checked += 1
    assert checked >= 20


def test_geometry_is_kept_per_segment_and_shared_across_gpus():
    """A second GPU's cost model of the same profile reuses the first's geometry (costs.Shared)."""
    prof = _stage("animatediff", 576, 1024, 16, "fp16", "decode", "efficient")
    a, b = CostModel(prof, find_gpu("RTX 2080 Ti")), CostModel(prof, find_gpu("RTX 4090"))
    seg = next(s for s in a.segments() if a.units[s.start].axis == "rows" and s.k > 1)
    rules = a.rules_for(frozenset())
    rc.rows_memory(a, seg, rules.segment(seg.start, seg.stop), a._entry(seg, frozenset(), rules))
    assert rc._geometry(b, seg) is rc._geometry(a, seg)


def test_skipping_repeated_slices_equals_every_slice(monkeypatch):
    """The geometry skips slices whose signature an earlier one had; with every slice distinct (a fresh
    geometry) the numbers are the same (test_fleet_speed checks this of the reference; the geometry is
    kept, so it is dropped here before the second pass)."""
    m = CostModel(_stage("svd", 576, 1024, 14, "fp16", "encode_vae"), find_gpu("RTX 4090"))
    segments = [s for s in m.segments() if m.units[s.start].axis == "rows" and s.k > 1][:12]
    rules = m.rules_for(frozenset())
    cases = [(seg, rules.segment(seg.start, seg.stop), m._entry(seg, frozenset(), rules)) for seg in segments]
    fast = [rc.rows_memory(m, *c) for c in cases]
    assert any(len(rc._geometry(m, seg).loop) < len(rc._geometry(m, seg).slices) for seg in segments)
    m.shared.__dict__.pop("_rows_geometry")
    counter = iter(range(10**9))
    monkeypatch.setattr(rc, "_signature", lambda *a: next(counter))  # every slice distinct: none skipped
    assert [rc.rows_memory(m, *c) for c in cases] == fast
    assert all(len(rc._geometry(m, seg).loop) == len(rc._geometry(m, seg).slices) for seg in segments)
