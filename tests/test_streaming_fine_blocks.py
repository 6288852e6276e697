"""Finer streaming blocks at run time: an adapter's ``stream_parts`` (AnimateDiff: each res block, spatial
transformer, motion module and resampler) name the blocks the profiler lists, the plan streams and the
streamer copies in. CPU: host == device, the same copies happen."""

from __future__ import annotations

import pytest
import torch
from tiny import CASES
from vramplan.runtime import apply_plan, uniform_plan
from vramplan.runtime.adapters.base import adapter_for
from vramplan.runtime.streaming import (
    adapter_block,
    block_of,
    owning_block,
    stream_block_of,
    streamable_blocks,
)


def test_stream_block_of_names_the_numbered_child_of_a_declared_part():
    parts = ("resnets", "attentions", "motion_modules", "upsamplers")
    assert stream_block_of("up_blocks.1.attentions.0.transformer_blocks.0", parts) == "up_blocks.1.attentions.0"
    assert stream_block_of("mid_block.motion_modules.0", parts) == "mid_block.motion_modules.0"
    assert stream_block_of("up_blocks.0.upsamplers.0", parts) == "up_blocks.0.upsamplers.0"
    assert stream_block_of("conv_in", parts) == "conv_in"
    assert stream_block_of("blocks.3.attn1.kv", parts) == "blocks.3"  # no declared part: the top-level block
    assert stream_block_of("up_blocks.1.attentions.0.proj_in") == block_of("up_blocks.1.attentions.0.proj_in")
    assert owning_block("up_blocks.1.attentions.0.proj_out", ["up_blocks.1", "up_blocks.1.attentions.0"]) == \
        "up_blocks.1.attentions.0"
    assert owning_block("up_blocks.10.resnets.0", ["up_blocks.1"]) is None  # a dotted prefix, not a string one


@pytest.fixture(scope="module")
def motion():
    return CASES["UNetMotionModel"]()


def test_motion_unet_streams_sub_blocks(motion):
    args, kwargs, shape = motion.inputs(1, 3, 5, 4)
    blocks = streamable_blocks(motion.model, shape)
    assert "up_blocks.0.resnets.0" in blocks and "up_blocks.0.motion_modules.1" in blocks
    assert "up_blocks.1.attentions.0" in blocks and "up_blocks.0" not in blocks
    adapter = adapter_for(motion.model)
    block = adapter_block(adapter)
    assert {block(op.name) for op in adapter.ops(motion.model)[0]} >= set(blocks)  # each is some unit's
    up0 = sum(t.numel() * t.element_size() for t in [*motion.model.up_blocks[0].parameters(),
                                                      *motion.model.up_blocks[0].buffers()])
    assert sum(w for b, w in blocks.items() if b.startswith("up_blocks.0.")) == up0  # the whole block, in parts


@pytest.mark.parametrize("k", [2, 3])
def test_every_fine_block_streamed_is_exact(motion, k):
    """All sub-blocks streamed under a grouped plan: bit for bit the plan without streaming; only the
    touched sub-blocks and the next one are on the device while a segment runs."""
    args, kwargs, shape = motion.inputs(1, 3, 5, 4, seed=k)
    model = motion.model
    blocks = list(streamable_blocks(model, shape))
    plan = uniform_plan(model, k, shape, group=True)
    with torch.no_grad(), apply_plan(model, plan):
        planned = motion.output(model, args, kwargs)
    plan.components[0].streamed = blocks
    most = []
    with torch.no_grad(), apply_plan(model, plan) as handle:
        streamer = handle.streamer
        originals = {op.name: op.fn for op in handle.ops}
        for op in handle.ops:

            def wrapped(ctx, *a, _fn=op.fn):
                most.append(sum(b.loaded for b in streamer.blocks.values()))
                return _fn(ctx, *a)

            op.fn = wrapped
        try:
            got = motion.output(model, args, kwargs)
        finally:
            for op in handle.ops:
                op.fn = originals[op.name]
    assert torch.equal(got, planned)
    widest = max(len({owning_block(op.name, blocks) for op in seg.ops}) for seg in handle.segments)
    assert 0 < max(most) <= widest + 1 < len(blocks)


def test_a_plan_streaming_top_level_blocks_still_runs(motion):
    """A plan made from a profile of before the finer blocks (streaming whole up blocks) runs, exactly."""
    args, kwargs, shape = motion.inputs(1, 3, 5, 4, seed=7)
    model = motion.model
    coarse = streamable_blocks(model, shape, top_level=True)
    assert "up_blocks.0" in coarse and "up_blocks.0.resnets.0" in coarse
    plan = uniform_plan(model, 2, shape, group=True)
    with torch.no_grad(), apply_plan(model, plan):
        planned = motion.output(model, args, kwargs)
    plan.components[0].streamed = ["down_blocks.1", "up_blocks.0", "up_blocks.1"]
    with torch.no_grad(), apply_plan(model, plan) as handle:
        got = motion.output(model, args, kwargs)
        assert set(handle.streamer.blocks) == {"down_blocks.1", "up_blocks.0", "up_blocks.1"}
    assert torch.equal(got, planned)
