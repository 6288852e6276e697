"""SVD's temporal VAE decoder: all frames decoded in one sliced pass equal the unsliced decode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plans import random_plans
from vramplan.planner.schema import SampleShape
from vramplan.runtime import MemoryTracker, apply_plan, fingerprint, list_units, uniform_plan
from vramplan.runtime.tiny import TINY_VAE, randomize_norms

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(0)
    return randomize_norms(AutoencoderKLTemporalDecoder(**{**TINY_VAE, "layers_per_block": 2}), 3).eval()


def _decode(vae, z, frames):
    with torch.no_grad():
        return vae.decode(z, num_frames=frames).sample


def _shape(frames, h, w, batch=1):
    return SampleShape(batch=batch, frames=frames, latent_height=h, latent_width=w, dtype="fp32")


@pytest.mark.parametrize("frames,h,w", [(5, 7, 9), (3, 4, 4), (1, 5, 3)])
@pytest.mark.parametrize("k", [2, 3, 64])
def test_uniform_plans_decode_exactly(vae, frames, h, w, k):
    z = torch.randn(frames, 4, h, w, generator=torch.Generator().manual_seed(k))
    expected = _decode(vae, z, frames)
    with apply_plan(vae, uniform_plan(vae, k, _shape(frames, h, w))):
        got = _decode(vae, z, frames)
    torch.testing.assert_close(got, expected, **TOL)


def test_two_videos_in_one_batch(vae):
    z = torch.randn(2 * 3, 4, 5, 6)
    expected = _decode(vae, z, 3)
    with apply_plan(vae, uniform_plan(vae, 4, _shape(3, 5, 6, batch=2))):
        torch.testing.assert_close(_decode(vae, z, 3), expected, **TOL)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), frames=st.integers(1, 6), h=st.integers(2, 8), w=st.integers(2, 8))
def test_random_plans_decode_exactly(vae, data, frames, h, w):
    z = torch.randn(frames, 4, h, w, generator=torch.Generator().manual_seed(frames * 100 + h * 10 + w))
    plan = data.draw(random_plans(list_units(vae), fingerprint(vae), _shape(frames, h, w)))
    expected = _decode(vae, z, frames)
    with apply_plan(vae, plan):
        torch.testing.assert_close(_decode(vae, z, frames), expected, **TOL)


def test_chunked_decoding_is_not_exact_but_sliced_is(vae):
    """diffusers' decode_chunk_size changes the video; a sliced plan with the same memory idea does not."""
    z = torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    whole = _decode(vae, z, 6)
    chunked = torch.cat([_decode(vae, z[i : i + 2], 2) for i in range(0, 6, 2)])
    assert (chunked - whole).abs().max() > 1e-2
    with apply_plan(vae, uniform_plan(vae, 3, _shape(6, 5, 5))), MemoryTracker() as tracker:
        sliced = _decode(vae, z, 6)
    torch.testing.assert_close(sliced, whole, **TOL)
    assert tracker.units["decoder.time_conv_out"].calls == 3


def test_remove_restores_decode(vae):
    z = torch.randn(3, 4, 4, 4)
    before = _decode(vae, z, 3)
    handle = apply_plan(vae, uniform_plan(vae, 2, _shape(3, 4, 4)))
    assert vae.decode is handle
    handle.remove()
    assert "decode" not in vae.__dict__
    assert torch.equal(_decode(vae, z, 3), before)
