"""Streaming units finer than a top-level block (an adapter's ``stream_parts``): the profile's
``block_weights`` name sub-modules (``up.resnets.0``), the cost model maps each unit to the longest of
them its name lies in, and the floor falls below a whole block plus the next one. No torch."""

from __future__ import annotations

import pytest
from vramplan.planner.costs import CostModel, Segment
from vramplan.planner.gpus import find_gpu
from vramplan.planner.placement import floor, search
from vramplan.planner.schema import AllocatorProfile, ModelProfile, ModelRef, SampleShape, UnitProfile

MIB = 2**20
GPU = find_gpu("RTX 4090")
# (unit, its table block, weights of its fine streaming block)
UNITS = [
    ("down.resnets.0", "down", 100), ("down.motion_modules.0", "down", 60),
    ("up.resnets.0", "up", 300), ("up.attentions.0.proj_in", "up", 0), ("up.attentions.0.transformer_blocks.0", "up", 200),
    ("up.attentions.0.proj_out", "up", 0), ("up.motion_modules.0", "up", 120), ("up.upsamplers.0", "up", 80),
    ("head", "head", 0),
]
FINE = {"down.resnets.0": 100, "down.motion_modules.0": 60, "up.resnets.0": 300, "up.attentions.0": 200,
        "up.motion_modules.0": 120, "up.upsamplers.0": 80}


def profile(fine: bool) -> ModelProfile:
    units = []
    for i, (name, block, _) in enumerate(UNITS):
        units.append(UnitProfile(
            name=name, axis="frames" if name != "head" else None, block=block, inputs=[UNITS[i - 1][0] if i else "x"],
            output_bytes=40 * MIB, output_shape=[8, 4], axis_length=8 if name != "head" else 0, flops=10**12,
            bytes_moved=100 * MIB, kernels=10, scratch={1: 200 * MIB} if name == "head" else
            {k: 200 * MIB // k for k in (1, 2, 4, 8)}))
    weights = FINE if fine else {"down": 160 * MIB, "up": 700 * MIB}
    weights = {b: w * MIB for b, w in weights.items()} if fine else weights
    return ModelProfile(
        model=ModelRef(class_name="HandmadeMotionUNet", config_hash="2" * 64, name="fine"),
        shape=SampleShape(batch=1, frames=8, latent_height=2, latent_width=2, dtype="fp16"),
        attention_kernel="flash", weight_bytes=900 * MIB, globals_bytes=MIB, result="head", units=units,
        original_peak_bytes=500 * MIB, block_weights=weights,
        allocator=AllocatorProfile(method="handmade", default={1: 1.0, 8: 1.0}, expandable_segments={1: 1.0, 8: 1.0},
                                   original_default=1.0, original_expandable_segments=1.0),
    )


def test_units_map_to_the_longest_streaming_block_inside_their_table_block():
    m = CostModel(profile(fine=True), GPU)
    assert m.unit_blocks == ("down.resnets.0", "down.motion_modules.0", "up.resnets.0", "up.attentions.0",
                             "up.attentions.0", "up.attentions.0", "up.motion_modules.0", "up.upsamplers.0", "head")
    assert m.streamable == tuple(FINE)
    coarse = CostModel(profile(fine=False), GPU)
    assert coarse.unit_blocks == tuple(block for _, block, _ in UNITS)  # a shipped coarse profile: unchanged


def test_present_fine_blocks_are_touched_plus_the_next_one():
    m = CostModel(profile(fine=True), GPU)
    streamed = frozenset(FINE)
    # the spatial transformer's middle unit: its own sub-block and the motion module after it
    assert m.present_blocks(Segment(4, 4, 2), streamed) == ["up.attentions.0", "up.motion_modules.0"]
    assert m.present_bytes(Segment(4, 4, 2), streamed) == 320 * MIB
    # a group over two sub-blocks holds both, then prefetches the third
    assert m.present_blocks(Segment(2, 3, 2), streamed) == ["up.resnets.0", "up.attentions.0", "up.motion_modules.0"]
    total, exposed = m.streaming_seconds(streamed)
    assert total == pytest.approx(sum(FINE.values()) * MIB / m.link_bytes_per_s)
    assert 0 <= exposed <= total


def test_fine_blocks_lower_the_floor_below_a_whole_block():
    fine, coarse = CostModel(profile(fine=True), GPU), CostModel(profile(fine=False), GPU)
    low, high = floor(fine), floor(coarse)
    assert low.needed_bytes < high.needed_bytes
    assert high.cost.streamed_bytes >= 700 * MIB  # the whole up block is on the device at the coarse floor
    assert low.cost.streamed_bytes <= 500 * MIB  # two of its sub-blocks at most (touched + next)
    sol = search(fine, low.needed_bytes, method="dp")  # the floor is reachable
    assert sol.needed_bytes <= low.needed_bytes + sol.streamed_weight_bytes
