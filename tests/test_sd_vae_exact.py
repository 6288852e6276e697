"""SD's AutoencoderKL decoder (AnimateDiff decodes B*T frames as images): sliced decode == unsliced."""

from __future__ import annotations

import pytest
import torch
import vramplan.runtime.adapters.sd_vae  # noqa: F401  (registers the adapter)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plans import random_plans
from vramplan.planner.errors import PlanMismatchError, UnsupportedArgumentError
from vramplan.planner.schema import SampleShape
from vramplan.runtime import MemoryTracker, apply_plan, fingerprint, list_units, uniform_plan
from vramplan.runtime.tiny import randomize_norms

TOL = dict(rtol=1e-5, atol=1e-5)

SD_VAE_TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)


def _vae(seed=0, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return randomize_norms(AutoencoderKL(**{**SD_VAE_TINY, **overrides}), seed + 1).eval()


@pytest.fixture(scope="module")
def vae():
    return _vae()


def _decode(vae, z, **kwargs):
    with torch.no_grad():
        return vae.decode(z, **kwargs)


def _shape(frames, h, w):
    return SampleShape(batch=1, frames=frames, latent_height=h, latent_width=w, dtype="fp32")


def _z(frames, h, w, seed=0):
    return torch.randn(frames, 4, h, w, generator=torch.Generator().manual_seed(seed))


def test_units_are_fine_grained_frames_units(vae):
    units = list_units(vae)
    names = [u.name for u in units]
    assert names == [
        "post_quant_conv",
        "decoder.mid_block.resnets.0",
        "decoder.mid_block.attentions.0",
        "decoder.mid_block.resnets.1",
        "decoder.up_blocks.0.resnets.0",
        "decoder.up_blocks.0.resnets.1",
        "decoder.up_blocks.0.upsamplers.0",
        "decoder.up_blocks.1.resnets.0",
        "decoder.up_blocks.1.resnets.1",
        "decoder.conv_norm_out",
    ]
    assert all(u.axis == "frames" and not u.needs_input_stats for u in units)
    modules = dict(vae.named_modules())
    assert all(n in modules for n in names)


@pytest.mark.parametrize("frames,h,w", [(5, 7, 9), (3, 4, 4), (1, 5, 3)])
@pytest.mark.parametrize("k", [2, 3, 64])
def test_uniform_plans_decode_exactly(vae, frames, h, w, k):
    z = _z(frames, h, w, seed=k)
    expected = _decode(vae, z).sample
    with apply_plan(vae, uniform_plan(vae, k, _shape(frames, h, w))):
        got = _decode(vae, z).sample
    torch.testing.assert_close(got, expected, **TOL)


def test_ungrouped_plan_and_tuple_return(vae):
    z = _z(4, 5, 6, seed=7)
    expected = _decode(vae, z, return_dict=False)
    with apply_plan(vae, uniform_plan(vae, 3, _shape(4, 5, 6), group=False)):
        got = _decode(vae, z, return_dict=False, generator=None)
    assert isinstance(got, tuple) and len(got) == 1
    torch.testing.assert_close(got[0], expected[0], **TOL)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), frames=st.integers(1, 6), h=st.integers(2, 8), w=st.integers(2, 8))
def test_random_plans_decode_exactly(vae, data, frames, h, w):
    z = _z(frames, h, w, seed=frames * 100 + h * 10 + w)
    plan = data.draw(random_plans(list_units(vae), fingerprint(vae), _shape(frames, h, w)))
    expected = _decode(vae, z).sample
    with apply_plan(vae, plan):
        torch.testing.assert_close(_decode(vae, z).sample, expected, **TOL)


def test_each_unit_runs_k_times(vae):
    z = _z(6, 4, 5, seed=3)
    expected = _decode(vae, z).sample
    with apply_plan(vae, uniform_plan(vae, 3, _shape(6, 4, 5))), MemoryTracker() as tracker:
        got = _decode(vae, z).sample
    torch.testing.assert_close(got, expected, **TOL)
    for unit in list_units(vae):
        assert tracker.units[unit.name].calls == 3, unit.name


def test_variant_without_post_quant_conv_or_mid_attention():
    vae = _vae(seed=1, use_post_quant_conv=False, mid_block_add_attention=False, layers_per_block=2)
    names = [u.name for u in list_units(vae)]
    assert names[0] == "decoder.conv_in"
    assert not any("attentions" in n for n in names)
    z = _z(3, 5, 4, seed=11)
    expected = _decode(vae, z).sample
    with apply_plan(vae, uniform_plan(vae, 2, _shape(3, 5, 4))):
        torch.testing.assert_close(_decode(vae, z).sample, expected, **TOL)


def test_use_slicing_gives_the_same_decode(vae):
    z = _z(4, 5, 5, seed=5)
    expected = _decode(vae, z).sample
    vae.enable_slicing()
    try:
        with apply_plan(vae, uniform_plan(vae, 2, _shape(4, 5, 5))):
            torch.testing.assert_close(_decode(vae, z).sample, expected, **TOL)
    finally:
        vae.disable_slicing()


def test_tiling_that_would_tile_is_refused(vae):
    big = vae.tile_latent_min_size + 1
    z = _z(2, big, 3)
    vae.enable_tiling()
    try:
        with apply_plan(vae, uniform_plan(vae, 2, _shape(2, big, 3))), pytest.raises(
            UnsupportedArgumentError, match="use_tiling"
        ):
            _decode(vae, z)
        # Small latents are not tiled by diffusers either: the plan runs.
        z = _z(2, 3, 3)
        expected = _decode(vae, z).sample
        with apply_plan(vae, uniform_plan(vae, 2, _shape(2, 3, 3))):
            torch.testing.assert_close(_decode(vae, z).sample, expected, **TOL)
    finally:
        vae.disable_tiling()


def test_plan_shape_is_batch_one_frames_n(vae):
    z = _z(4, 3, 3)
    plan = uniform_plan(vae, 2, SampleShape(batch=2, frames=2, latent_height=3, latent_width=3, dtype="fp32"))
    with apply_plan(vae, plan), pytest.raises(PlanMismatchError):
        _decode(vae, z)


def test_example_inputs(vae):
    from vramplan.runtime.adapters.base import adapter_for

    (z,) = adapter_for(vae).example_inputs(vae, _shape(3, 5, 7), device="meta")
    assert z.shape == (3, 4, 5, 7) and z.device.type == "meta"


def test_remove_restores_decode(vae):
    z = _z(3, 4, 4)
    before = _decode(vae, z).sample
    handle = apply_plan(vae, uniform_plan(vae, 2, _shape(3, 4, 4)))
    assert vae.decode is handle
    handle.remove()
    assert "decode" not in vae.__dict__
    assert torch.equal(_decode(vae, z).sample, before)
