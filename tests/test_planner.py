"""The planner on handmade profiles: its choices equal brute force; bad input is explained. No torch."""

from __future__ import annotations

import itertools

import pytest
from vramplan.planner.costs import CostModel, Segment
from vramplan.planner.errors import InfeasibleError, UnknownGPUError
from vramplan.planner.gpus import find_gpu
from vramplan.planner.schema import AllocatorProfile, ModelProfile, ModelRef, SampleShape, UnitProfile
from vramplan.planner.solve import solve

MIB = 2**20


def _unit(name, axis, inputs, out, shape, length, scratch, stats=False, flops=10**9, kernels=5):
    return UnitProfile(
        name=name, axis=axis, needs_input_stats=stats, block=name.split(".")[0], inputs=inputs,
        output_bytes=out * MIB, output_shape=shape, axis_length=length, flops=flops,
        bytes_moved=out * MIB * 3, kernels=kernels, scratch={k: v * MIB for k, v in scratch.items()},
    )


def handmade() -> ModelProfile:
    units = [
        _unit("a.conv", "frames", ["x"], 100, [4, 10], 4, {1: 300, 2: 150, 4: 80}),
        _unit("a.res", "frames", ["a.conv"], 100, [4, 10], 4, {1: 260, 2: 140, 4: 70}, flops=3 * 10**9),
        _unit("a.temporal", "tokens", ["a.res"], 100, [4, 10], 6, {1: 220, 2: 110, 3: 80, 6: 40}, stats=True),
        _unit("a.attn", "tokens", ["a.temporal"], 100, [4, 10], 6, {1: 500, 2: 250, 3: 170, 6: 90}, kernels=20),
        _unit("b.up", "frames", ["a.attn", "a.conv"], 200, [4, 20], 4, {1: 400, 2: 210, 4: 110}),
        _unit("b.out", "frames", ["b.up"], 200, [4, 20], 4, {1: 250, 2: 130, 4: 70}),
        _unit("c.head", None, ["b.out"], 50, [4, 5], 0, {1: 90}),
    ]
    return ModelProfile(
        model=ModelRef(class_name="Handmade", config_hash="0" * 64, name="handmade"),
        shape=SampleShape(batch=1, frames=4, latent_height=2, latent_width=3, dtype="fp16"),
        attention_kernel="flash", weight_bytes=0, globals_bytes=5 * MIB, result="c.head", units=units,
        original_peak_bytes=900 * MIB,
        allocator=AllocatorProfile(method="handmade", default={1: 1.0, 8: 1.0}, expandable_segments={1: 1.0, 8: 1.0},
                                   original_default=1.0, original_expandable_segments=1.0),
    )


def brute_force(model: CostModel, budget: int, max_latency: float | None, host=frozenset(), streamed=frozenset()):
    """Every valid plan, built unit by unit (k per unit, join-with-previous per pair, depth 1/2/4 for
    groups of k >= 4), not from segments(). A statistics unit may be joined (recompute or stats from
    the full input). Budgets count every weight resident, as solve() does."""
    units = model.units
    choices = [sorted(u.scratch) for u in units]
    credit = model.streamed_weight_bytes(streamed)
    exposed = model.streaming_seconds(streamed)[1]
    best = None
    for ks in itertools.product(*choices):
        for joins in itertools.product([False, True], repeat=len(units) - 1):
            valid = all(
                not joined
                or (units[j + 1].axis is not None and units[j + 1].axis == units[j].axis and ks[j] == ks[j + 1]
                    and ks[j] > 1)
                for j, joined in enumerate(joins)
            )
            if not valid:
                continue
            spans, start = [], 0
            for j in range(1, len(units) + 1):
                if j == len(units) or not joins[j - 1]:
                    spans.append((start, j - 1, ks[start]))
                    start = j
            depths = [[1, 2, 4] if b > a and k >= 4 else [1] for a, b, k in spans]
            for ds in itertools.product(*depths):
                segments = [Segment(a, b, k, d) for (a, b, k), d in zip(spans, ds, strict=True)]
                costs = [model.cost(s, host, streamed) for s in segments]
                peak = max(c.needed_bytes for c in costs)
                latency = sum(c.seconds for c in costs) + exposed
                if peak > budget + credit or (max_latency is not None and latency > max_latency + 1e-12):
                    continue
                key = (latency, peak) if max_latency is None else (peak, latency)
                if best is None or key < best[0]:
                    best = (key, segments)
    return best


@pytest.mark.parametrize("method", ["ilp", "dp"])
@pytest.mark.parametrize("budget_mib", [2000, 900, 700, 600, 520])
def test_min_latency_equals_brute_force(method, budget_mib):
    model = CostModel(handmade(), find_gpu("RTX 4090"))
    best = brute_force(model, budget_mib * MIB, None)
    solution = solve(model, budget_mib * MIB, method=method)
    assert best is not None
    assert solution.latency_s == pytest.approx(best[0][0], rel=1e-9)
    assert solution.needed_bytes <= budget_mib * MIB


@pytest.mark.parametrize("method", ["ilp", "dp"])
def test_min_peak_under_latency_equals_brute_force(method):
    model = CostModel(handmade(), find_gpu("RTX 4090"))
    fastest = brute_force(model, 10**12, None)[0][0]
    for slack in (1.0, 1.002, 1.01, 1.5):
        best = brute_force(model, 10**12, fastest * slack)
        solution = solve(model, 10**12, max_latency_s=fastest * slack, method=method)
        assert solution.needed_bytes == best[0][0], slack
        assert solution.latency_s <= fastest * slack + 1e-12


def test_values_made_inside_a_group_stay_slice_sized():
    model = CostModel(handmade(), find_gpu("RTX 4090"))
    alone = model.cost(Segment(4, 4, 2))  # b.up alone: its 200 MiB output gets a full buffer
    grouped = model.cost(Segment(4, 5, 2))  # b.up + b.out: b.up's output lives one slice at a time
    assert alone.live_bytes == model.live_in[4] + 200 * MIB
    assert grouped.live_bytes == model.live_in[4] + 200 * MIB  # only b.out's buffer
    # ...and b.out's own input (half of b.up's output) is a slice held while b.out runs.
    assert grouped.transient_bytes == 100 * MIB + 130 * MIB


def test_infeasible_names_smallest_peak_and_unit():
    model = CostModel(handmade(), find_gpu("RTX 4090"))
    with pytest.raises(InfeasibleError) as info:
        solve(model, 100 * MIB)
    err = info.value
    floor = brute_force(model, 10**12, 10**9)  # min peak with no latency limit
    assert err.min_needed_bytes == floor[0][0]
    assert err.unit in {u.name for u in model.units}
    assert "smallest reachable activation peak" in str(err)


@pytest.mark.parametrize("name", ["2080Ti", "RTX 2080 Ti", "rtx2080ti", "NVIDIA GeForce RTX 2080 Ti", "2080 ti"])
def test_gpu_names_match_forgivingly(name):
    assert find_gpu(name).name == "RTX 2080 Ti"


def test_unknown_gpu_suggests_close_names():
    with pytest.raises(UnknownGPUError, match=r"unknown GPU '2080Tii'.*Did you mean: .*RTX 2080 Ti"):
        find_gpu("2080Tii")


def test_gpu_profiles_are_complete():
    from vramplan.planner.gpus import all_gpus

    names = {g.name for g in all_gpus()}
    for required in ["GTX 1080 Ti", "RTX 2080 Ti", "T4", "RTX 3060 12GB", "RTX 3090", "A10G", "L4", "RTX 4090",
                     "A100 40GB", "A100 80GB", "L40S", "H100 SXM", "H100 PCIe", "H200", "RTX 5090"]:
        assert required in names
    for gpu in all_gpus():
        assert gpu.memory_usable_bytes <= gpu.memory_total_bytes
        assert gpu.sources
        assert ("flash" in gpu.attention_kernels) == (float(gpu.compute_capability) >= 8.0)
