"""The profiler is deterministic, and the planner's memory model predicts what the runtime measures."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plans import random_plans
from tiny import SVD_TINY
from vramplan.planner.costs import CostModel, Segment
from vramplan.planner.gpus import find_gpu
from vramplan.planner.plan import make_plan
from vramplan.planner.schema import SampleShape
from vramplan.runtime import empty_model, fingerprint, list_units
from vramplan.runtime.profiler import profile, slice_counts
from vramplan.runtime.verify import verify

SHAPE = SampleShape(batch=2, frames=5, latent_height=9, latent_width=7, dtype="fp32")


@pytest.fixture(scope="module")
def meta_tiny():
    from diffusers import UNetSpatioTemporalConditionModel

    return empty_model(UNetSpatioTemporalConditionModel, SVD_TINY, torch.float32)


@pytest.fixture(scope="module")
def tiny_profile(meta_tiny):
    return profile(meta_tiny, SHAPE, "cpu_flash", name="tiny", max_k=64)


def test_slice_counts_keep_the_smallest_k_per_slice_size():
    assert slice_counts(28) == [1, 2, 4, 7, 14, 28]
    assert slice_counts(9216, max_k=16) == [1, 2, 4, 8, 16]
    assert slice_counts(1) == [1]


def test_profile_is_deterministic(meta_tiny, tiny_profile):
    again = profile(meta_tiny, SHAPE, "cpu_flash", name="tiny", max_k=64)
    assert json.loads(again.model_dump_json()) == json.loads(tiny_profile.model_dump_json())


def test_profile_describes_every_unit(meta_tiny, tiny_profile):
    assert [u.name for u in tiny_profile.units] == [u.name for u in list_units(meta_tiny)]
    conv_in = tiny_profile.units[0]
    assert conv_in.axis_length == 10 and conv_in.output_shape == [10, 32, 9, 7]
    assert conv_in.flops == 2 * 10 * 32 * 9 * 7 * 8 * 9  # 2 * out elements * in_channels * 3x3
    temporal = next(u for u in tiny_profile.units if u.needs_input_stats)
    assert temporal.axis_length == 63 and 63 in temporal.scratch
    assert all(u.scratch[1] >= max(u.scratch.values()) for u in tiny_profile.units)
    assert tiny_profile.original_peak_bytes > 0 and tiny_profile.weight_bytes > 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_memory_model_predicts_measured_peak_for_random_plans(meta_tiny, tiny_profile, data):
    """Any plan, groups included: predicted activation peak within 5% of the measured one."""
    units = list_units(meta_tiny)
    k_ok = {u.name: set(u.scratch) for u in tiny_profile.units}
    plan = data.draw(random_plans(units, fingerprint(meta_tiny), SHAPE, max_k=64)).components[0]
    # Only slice counts the profile measured can be predicted.
    if any(plan.k(u.name) not in k_ok[u.name] for u in units):
        return
    model = CostModel(tiny_profile, find_gpu("RTX 4090"), allocator="none")
    predicted = max(model.cost(seg).activation_bytes for seg in _segments(model, plan))
    measured = verify(plan, model=meta_tiny).measured_activation_bytes
    assert predicted == pytest.approx(measured, rel=0.02)


def _segments(model, plan):
    group_at = {g.units[0]: g for g in plan.groups}
    i = 0
    while i < model.n:
        name = model.units[i].name
        size = len(group_at[name].units) if name in group_at else 1
        yield Segment(i, i + size - 1, plan.k(name))
        i += size


def test_planned_tiny_model_verifies(meta_tiny, tiny_profile):
    from vramplan.planner.errors import InfeasibleError

    gpu = find_gpu("RTX 4090")
    base = gpu.cuda_context_bytes + tiny_profile.weight_bytes
    planned = 0
    for fraction in (1.0, 0.6, 0.4, 0.3):
        budget = int(tiny_profile.original_peak_bytes * fraction)
        try:
            plan = make_plan(tiny_profile, gpu, usable_bytes=int((base + budget) / 0.98) + 1, allocator="none")
        except InfeasibleError:
            continue
        report = verify(plan, model=meta_tiny)
        assert abs(report.error) < 0.05
        assert plan.prediction.activation_peak_bytes <= budget
        planned += 1
    assert planned >= 3


def test_full_size_svd_pipeline_plan_verifies_within_5_percent():
    """A shipped profile's plan, its UNet and VAE decoder executed on meta tensors at full size."""
    from vramplan.runtime.verify import verify_all

    from vramplan import plan_for

    plan = plan_for(gpu="2080Ti", model="svd", height=512, width=512, vram_gb=5.0)
    reports = verify_all(plan)
    assert {r.component for r in reports} == {"unet", "vae", "vae_encoder", "image_encoder"}
    for report in reports:
        assert abs(report.error) < 0.05, report


def test_block_weights_are_the_blocks_own_parameters(meta_tiny, tiny_profile):
    """Every listed block is a unit's streaming block (its table block, or the finer child the SVD adapter
    declares: ``stream_parts``) and a module; its bytes are its parameters and buffers; the sum stays
    within the model's weights."""
    from vramplan.runtime.adapters.base import adapter_for
    from vramplan.runtime.fake import weight_bytes
    from vramplan.runtime.streaming import adapter_block

    modules = dict(meta_tiny.named_modules())
    block = adapter_block(adapter_for(meta_tiny))
    blocks = {block(u.name) for u in tiny_profile.units}
    assert all(block(u.name).startswith(u.block) for u in tiny_profile.units)  # inside its table block
    assert tiny_profile.block_weights and set(tiny_profile.block_weights) <= blocks
    for name, nbytes in tiny_profile.block_weights.items():
        assert nbytes == weight_bytes(modules[name]) > 0
    assert sum(tiny_profile.block_weights.values()) <= tiny_profile.weight_bytes
    assert {"down_blocks.0.resnets.0", "mid_block.resnets.0", "up_blocks.1.attentions.0"} <= set(
        tiny_profile.block_weights)


def test_block_weights_leave_out_a_block_read_elsewhere(meta_tiny):
    """A block whose weights another block's unit (or the prologue) reads may not stream."""
    from vramplan.runtime.streaming import WeightReaders

    readers = WeightReaders(meta_tiny)
    units = [u.name for u in list_units(meta_tiny)]
    weight = meta_tiny.down_blocks[0].resnets[0].spatial_res_block.conv1.weight
    own = next(u for u in units if u.startswith("down_blocks.0."))
    other = next(u for u in units if u.startswith("up_blocks.0."))
    readers.readers[id(weight.untyped_storage())] = {own, other}
    assert "down_blocks.0" not in readers.block_weights(units)
    readers.readers[id(weight.untyped_storage())] = {""}  # the call's prologue
    assert "down_blocks.0" not in readers.block_weights(units)
    readers.readers[id(weight.untyped_storage())] = {own}
    assert "down_blocks.0" in readers.block_weights(units)
