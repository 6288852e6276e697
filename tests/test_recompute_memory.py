"""A recompute pass holds what the cost model prices: ``merged_moments`` lets go of each recomputed piece
before the next is made (it held the two looked-ahead pieces and the last one, so a group of 8 slices,
2 in flight, peaked a slice above its prediction: the SVD min-memory plan's decode measured -6.25 % on
meta, peak in its recompute pass)."""

from __future__ import annotations

import torch
from vramplan.runtime.memory import MemoryTracker
from vramplan.runtime.norm import merged_moments

GIB = 2**30


def test_merged_moments_holds_no_recomputed_piece_while_the_next_is_made():
    shape, slices = (2, 3, 4, 8, 16), 6  # fp16 pieces: each piece.float() is twice a piece
    piece_bytes = 2 * 3 * 4 * 8 * 16 * 2
    before = []
    with MemoryTracker() as tracker:

        def recomputed():  # what a recompute pass yields: a fresh tensor per slice
            for _ in range(slices):
                before.append(tracker.current_bytes)
                yield torch.empty(shape, dtype=torch.float16, device="meta")

        mean, var = merged_moments(recomputed(), reduce_dims=(1, 3, 4))
    # while slice i >= 2 is made: one fp32 copy of the last piece at most (small moments aside)
    assert len(before) == slices
    assert max(before[2:]) < 2 * piece_bytes + piece_bytes // 2, [b / piece_bytes for b in before]


def test_svd_decode_with_a_depth_2_recompute_group_is_predicted(tmp_path):
    """The full-size SVD decode on meta tensors (1024x576, 14 frames, fp16) under a plan whose
    ``up_blocks.1.resnets.0`` temporal group runs 8 slices 2 at a time with norm2's statistics recomputed:
    measured = the cost model's prediction (from a fresh CostModel on the shipped profile)."""
    from vramplan.planner.costs import CostModel
    from vramplan.planner.gpus import find_gpu
    from vramplan.planner.integrity import shipped_profile
    from vramplan.planner.plan import component_costs
    from vramplan.runtime.verify import _build, _run

    from vramplan import plan_for

    fastest = plan_for(gpu="2080Ti", model="svd")
    plan = plan_for(gpu="2080Ti", model="svd", max_latency_s=fastest.prediction.latency_s * 1.1)
    comp = plan.component("vae")
    group = next(g for g in comp.groups if g.units[0].startswith("decoder.up_blocks.1.resnets.0.temporal"))
    assert group.units[1] in comp.recompute
    if (group.k, group.depth) != (8, 2):  # the planner chose otherwise: the case under test, set by hand
        group.k, group.depth = 8, 2
        comp.slices.update({u: 8 for u in group.units})
    profile = next(s for s in shipped_profile(plan).stages if s.stage == "decode").profile
    model = CostModel(profile, find_gpu(plan.target.gpu), plan.target.allocator)
    costs = component_costs(model, comp)
    seg, cost = max(costs, key=lambda sc: sc[1].activation_bytes)
    assert model.units[seg.start].name == group.units[0]  # this group sets the decode's peak
    stage = next(s for s in plan.stages if s.component == "vae")
    stage.activation_bytes = cost.activation_bytes
    report = _run(plan, comp, _build(plan, comp))
    # within a few hundred bytes (the statistics' small tensors); the bug was a 63 MiB slice (6.25 %)
    assert abs(report.measured_activation_bytes / cost.activation_bytes - 1) < 1e-5, (
        report.measured_activation_bytes / GIB, cost.activation_bytes / GIB, report.peak_label)
