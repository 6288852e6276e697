"""The planned SVD UNet forward equals the original (fp32, 1e-5) for any plan."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plans import random_plans
from tiny import svd_inputs
from vramplan.planner.errors import PlanConflictError
from vramplan.runtime import MemoryTracker, apply_plan, fingerprint, list_units, sample_shape, uniform_plan

TOL = dict(rtol=1e-5, atol=1e-5)


def _run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


@pytest.mark.parametrize("batch,frames,height,width", [(1, 5, 8, 8), (2, 3, 9, 7), (2, 7, 5, 11)])
@pytest.mark.parametrize("k,group", [(2, False), (3, True), (4, True), (64, True)])
def test_uniform_plan_matches_original(tiny_unet, batch, frames, height, width, k, group):
    inputs = svd_inputs(tiny_unet, batch=batch, frames=frames, height=height, width=width)
    expected = _run(tiny_unet, inputs)
    plan = uniform_plan(tiny_unet, k, sample_shape(inputs[0]), group=group)
    with apply_plan(tiny_unet, plan):
        got = _run(tiny_unet, inputs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), batch=st.sampled_from([1, 2]), frames=st.integers(1, 7),
       height=st.integers(3, 11), width=st.integers(3, 11))
def test_random_plans_match_original(tiny_unet, data, batch, frames, height, width):
    inputs = svd_inputs(tiny_unet, batch=batch, frames=frames, height=height, width=width, seed=frames)
    shape = sample_shape(inputs[0])
    plan = data.draw(random_plans(list_units(tiny_unet), fingerprint(tiny_unet), shape))
    expected = _run(tiny_unet, inputs)
    with apply_plan(tiny_unet, plan):
        got = _run(tiny_unet, inputs)
    torch.testing.assert_close(got, expected, **TOL)


def test_plan_really_slices_each_unit(tiny_unet):
    """Every sliced unit runs once per slice (+1 statistics pass): the plan is executed, not ignored."""
    inputs = svd_inputs(tiny_unet, batch=2, frames=5, height=8, width=8)
    plan = uniform_plan(tiny_unet, 3, sample_shape(inputs[0]), group=True)
    with apply_plan(tiny_unet, plan), MemoryTracker() as tracker, torch.no_grad():
        tiny_unet(*inputs)
    for unit in list_units(tiny_unet):
        assert tracker.units[unit.name].calls == 3 + unit.needs_input_stats, unit.name


def test_k_beyond_the_axis_is_one_element_per_slice(tiny_unet):
    inputs = svd_inputs(tiny_unet, batch=1, frames=2, height=4, width=4)
    expected = _run(tiny_unet, inputs)
    plan = uniform_plan(tiny_unet, 1000, sample_shape(inputs[0]))
    with apply_plan(tiny_unet, plan), MemoryTracker() as tracker:
        got = _run(tiny_unet, inputs)
    torch.testing.assert_close(got, expected, **TOL)
    assert tracker.units["conv_in"].calls == 2  # B*T frames
    assert tracker.units["down_blocks.0.resnets.0.temporal_res_block.norm1"].calls == 16 + 1  # 4x4 tokens + stats


def test_remove_restores_bit_identical_forward(tiny_unet):
    inputs = svd_inputs(tiny_unet, batch=2, frames=3, height=6, width=6)
    before = _run(tiny_unet, inputs)
    forward_before = tiny_unet.forward
    handle = apply_plan(tiny_unet, uniform_plan(tiny_unet, 2, sample_shape(inputs[0])))
    assert tiny_unet.forward is handle
    handle.remove()
    handle.remove()  # idempotent
    assert "forward" not in tiny_unet.__dict__
    assert tiny_unet.forward == forward_before
    assert torch.equal(_run(tiny_unet, inputs), before)


def test_an_opaque_forward_wrapper_is_refused_and_kept(tiny_unet):
    """A forward patched by someone else in a way vramplan cannot see through would be bypassed by the
    plan: apply_plan refuses it by name and leaves it in place (composable hooks: test_hooks.py)."""
    inputs = svd_inputs(tiny_unet, batch=1, frames=3, height=6, width=6)
    calls = []
    original = tiny_unet.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    tiny_unet.forward = wrapped
    try:
        with pytest.raises(PlanConflictError, match="wrapped"):
            apply_plan(tiny_unet, uniform_plan(tiny_unet, 2, sample_shape(inputs[0])))
        assert tiny_unet.forward is wrapped
        _run(tiny_unet, inputs)
        assert calls == [1]
    finally:
        del tiny_unet.forward


def test_k1_plan_is_the_plain_forward(tiny_unet):
    inputs = svd_inputs(tiny_unet, batch=1, frames=4, height=5, width=6)
    expected = _run(tiny_unet, inputs)
    with apply_plan(tiny_unet, uniform_plan(tiny_unet, 1, sample_shape(inputs[0]))):
        torch.testing.assert_close(_run(tiny_unet, inputs), expected, **TOL)
