"""The Wan VAE decode (``AutoencoderKLWan``, 2.1 and 2.2 decoders) under plans: one rows unit per up
block (each its own partition, or a group sharing one), rows outer, frames inner, each slice with its
own causal cache; values between segments in host memory or not — equal to the stock ``vae.decode``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from plans import random_plans
from tiny import tiny_wan_vae
from vramplan.planner.errors import PlanMismatchError, UnsupportedArgumentError
from vramplan.planner.schema import ComponentPlan
from vramplan.runtime import apply_plan, fingerprint, list_units, sample_shape, uniform_plan

TOL = dict(rtol=1e-5, atol=1e-5)
VAES = {"2.1": tiny_wan_vae(), "2.2": tiny_wan_vae(1, wan22=True)}


def _z(vae, b, t, h, w, seed=0):
    return torch.randn(b, vae.config.z_dim, t, h, w, generator=torch.Generator().manual_seed(seed))


def _decode(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample


def test_units_and_shape():
    vae = VAES["2.1"]
    units = list_units(vae)
    ups = [f"decoder.up_blocks.{i}" for i in range(len(vae.decoder.up_blocks))]
    assert [(u.name, u.axis) for u in units] == [("decoder.mid_block", None)] + [(n, "rows") for n in ups]
    shape = sample_shape(_z(vae, 2, 5, 6, 4), vae)  # Wan latents are [B, C, T, h, w]
    assert (shape.batch, shape.frames, shape.latent_height, shape.latent_width) == (2, 5, 6, 4)
    # a uniform plan slices rows where frames cannot be sliced
    assert uniform_plan(vae, 3, shape).components[0].slices == dict.fromkeys(ups, 3)


def test_units_cut_before_an_upsampler_without_shortcut():
    """Wan 2.1: the value between up units is a block's residual output, before its upsampler makes it
    4-8x larger; Wan 2.2 adds a shortcut of the block's input to the upsampler's output, so its
    upsampler stays with its block."""
    from vramplan.runtime.adapters.wan_vae import _units

    kinds = {v: [[(i, kind) for i, kind, _ in parts] for parts in _units(vae)] for v, vae in VAES.items()}
    assert kinds["2.1"] == [[(0, "res")], [(0, "up"), (1, "res")], [(1, "up"), (2, "res")],
                            [(2, "up"), (3, "res"), (3, "head")]]
    assert kinds["2.2"] == [[(0, "res"), (0, "up")], [(1, "res"), (1, "up")], [(2, "res"), (2, "up")],
                            [(3, "res"), (3, "head")]]


@st.composite
def _plans(draw, vae, shape):
    """Random plans over the decode's units (slice counts per unit, groups or not) with a random set of
    the values crossing a segment boundary placed in host memory."""
    units = list_units(vae)
    comp = draw(random_plans(units, fingerprint(vae), shape, max_k=12, component="vae")).components[0]
    group = {n: i for i, g in enumerate(comp.groups) for n in g.units}
    cross = [a.name for a, b in zip(units, units[1:], strict=False)
             if a.name not in group or group[a.name] != group.get(b.name)]
    host = [n for n in cross if draw(st.booleans())]
    return comp.model_copy(update={"host": host})


@settings(max_examples=6, deadline=None)
@given(st.sampled_from(["2.1", "2.2"]), st.integers(1, 4), st.integers(3, 9), st.integers(2, 7), st.data())
def test_random_plans_equal_the_stock_decode(version, t, h, w, data):
    """Latent frames 1..4 (the first frame's special case, the temporal upsampling), heights and widths
    that do not divide, k that does not divide the rows, each up block with its own slice count or a
    group sharing one, values between segments on host or not."""
    vae = VAES[version]
    z = _z(vae, 1, t, h, w, seed=t * 100 + h * 10 + w)
    ref = _decode(vae, z)
    comp = data.draw(_plans(vae, sample_shape(z, vae)))
    with apply_plan(vae, comp):
        out = _decode(vae, z)
    torch.testing.assert_close(out, ref, **TOL)


def test_uniform_plan_with_the_mid_output_on_host():
    vae = VAES["2.2"]
    z = _z(vae, 1, 3, 5, 4, seed=7)
    ref = _decode(vae, z)
    comp = uniform_plan(vae, 5, sample_shape(z, vae)).components[0].model_copy(update={"host": ["decoder.mid_block"]})
    with apply_plan(vae, comp):
        torch.testing.assert_close(_decode(vae, z), ref, **TOL)


@pytest.mark.parametrize("k", [24, 100])
def test_one_row_per_slice_and_beyond(k):
    """k = the output rows (24: one row per slice) and more than that (clamped)."""
    vae = VAES["2.1"]
    z = _z(vae, 1, 2, 3, 3, seed=k)
    ref = _decode(vae, z)
    with apply_plan(vae, uniform_plan(vae, k, sample_shape(z, vae))):
        torch.testing.assert_close(_decode(vae, z), ref, **TOL)


def test_batch_of_two_and_bf16():
    vae = VAES["2.1"]
    z = _z(vae, 2, 3, 5, 4, seed=3)
    ref = _decode(vae, z)
    with apply_plan(vae, uniform_plan(vae, 4, sample_shape(z, vae))):
        torch.testing.assert_close(_decode(vae, z), ref, **TOL)
    low = tiny_wan_vae().to(torch.bfloat16)
    zl = z.to(torch.bfloat16)
    ref_l = _decode(low, zl).float()
    with apply_plan(low, uniform_plan(low, 4, sample_shape(zl, low))):
        out = _decode(low, zl).float()
    assert (out - ref_l).abs().max() <= 0.05  # bf16 noise on a [-1, 1] video


def test_bad_input_is_refused():
    vae = VAES["2.1"]
    z = _z(vae, 1, 2, 5, 4)
    plan = uniform_plan(vae, 2, sample_shape(z, vae))
    with apply_plan(vae, plan):
        with pytest.raises(UnsupportedArgumentError, match="4-channel"):
            _decode(vae, torch.randn(1, 16, 2, 5, 4))
        with pytest.raises(PlanMismatchError):
            _decode(vae, _z(vae, 1, 3, 5, 4))  # another shape than the plan's
    vae.enable_tiling()
    try:
        with apply_plan(vae, plan), pytest.raises(UnsupportedArgumentError, match="disable_tiling"):
            _decode(vae, z)
    finally:
        vae.disable_tiling()
    with pytest.raises(PlanMismatchError):
        apply_plan(VAES["2.2"], plan)  # a plan for another VAE configuration
    comp = ComponentPlan(component="vae", model=fingerprint(vae), shape=sample_shape(z, vae))
    assert comp.slices == {}


def test_more_slices_hold_less_on_meta():
    """A slice's causal cache and output die with it: on meta tensors the measured peak of separate
    up segments falls as k grows (a slice walk that kept itself alive in a reference cycle grew it:
    at 12x10 latents, 4 -> 16 slices, 10.7 -> 14.1 MB)."""
    from diffusers import AutoencoderKLWan
    from tiny import TINY_WAN_VAE
    from vramplan.runtime.verify import verify

    vae = VAES["2.1"]
    shape = sample_shape(_z(vae, 1, 2, 8, 6), vae)
    with torch.device("meta"):
        meta = AutoencoderKLWan(**TINY_WAN_VAE)
    peaks = []
    for k in (2, 8):
        comp = uniform_plan(vae, k, shape).components[0].model_copy(update={"groups": []})
        peaks.append(verify(comp, meta).measured_activation_bytes)
    assert peaks[1] < peaks[0]
