"""The Wan VAE encode (``AutoencoderKLWan.encode``, 2.1 and 2.2 encoders) under plans: rows outer, the
stock chunks (1, 4, 4, ... frames) inner, each slice with its own causal cache — equal to the stock
``vae.encode``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiny_wan_vae
from vramplan.planner.errors import InvalidArgumentError, PlanMismatchError, UnsupportedArgumentError
from vramplan.runtime import apply_plan, list_units, sample_shape, uniform_plan
from vramplan.runtime.adapters.wan_vae_encoder import spatial_ratio

import vramplan

TOL = dict(rtol=1e-5, atol=1e-5)
ENC = "vae_encoder"


VAES = {"2.1": tiny_wan_vae(2), "2.2": tiny_wan_vae(3, wan22=True)}


def _x(b, t, h, w, seed=0):
    return torch.randn(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed))


def _encode(vae, x):
    with torch.no_grad():
        return vae.encode(x).latent_dist.parameters


def test_units_and_shape():
    vae = VAES["2.2"]
    assert [(u.name, u.axis) for u in list_units(vae, component=ENC)] == [
        ("encoder.down_blocks", "rows"), ("encoder.mid_block", None)]
    x = _x(2, 9, 32, 16)
    shape = sample_shape(x, vae)  # the video [B, C, T, H, W]: video frames, pixel rows and columns
    assert (shape.batch, shape.frames, shape.latent_height, shape.latent_width) == (2, 9, 32, 16)
    comp = uniform_plan(vae, 3, shape, component=ENC).components[0]
    assert comp.component == ENC and comp.slices == {"encoder.down_blocks": 3}


@settings(max_examples=6, deadline=None)
@given(st.sampled_from(["2.1", "2.2"]), st.integers(0, 2), st.integers(1, 7), st.integers(1, 4), st.integers(1, 12),
       st.booleans())
def test_random_plans_equal_the_stock_encode(version, n, h, w, k, host):
    """1, 5 or 9 frames (the first frame alone, then chunks of 4: both temporal downsamplers' caches),
    heights and widths whose latent rows do not divide by k, k up to (and beyond) the latent rows, the
    down blocks' output on host or not."""
    vae = VAES[version]
    f = spatial_ratio(vae)
    if version == "2.2":  # the stock 2.2 encode needs 2 latent rows and columns (its last 3x3 stride-2 conv)
        h, w = max(h, 2), max(w, 2)
    x = _x(1, 1 + 4 * n, h * f, w * f, seed=n * 100 + h * 10 + w)
    ref = _encode(vae, x)
    comp = uniform_plan(vae, k, sample_shape(x, vae), component=ENC).components[0]
    if host:
        comp = comp.model_copy(update={"host": ["encoder.down_blocks"]})
    with apply_plan(vae, comp):
        out = _encode(vae, x)
    torch.testing.assert_close(out, ref, **TOL)


def test_wan21_odd_pixel_sizes_and_one_row_per_slice():
    """Wan 2.1 encodes any height and width (its stride-2 convs pad one row): 44x20 pixels; k = the
    latent rows (one row per slice)."""
    vae = VAES["2.1"]
    x = _x(1, 5, 44, 20, seed=4)
    ref = _encode(vae, x)
    rows = ref.shape[-2]
    with apply_plan(vae, uniform_plan(vae, rows, sample_shape(x, vae), component=ENC)):
        torch.testing.assert_close(_encode(vae, x), ref, **TOL)


def test_batch_of_two_and_bf16():
    vae = VAES["2.1"]
    x = _x(2, 5, 32, 24, seed=5)
    ref = _encode(vae, x)
    with apply_plan(vae, uniform_plan(vae, 2, sample_shape(x, vae), component=ENC)):
        torch.testing.assert_close(_encode(vae, x), ref, **TOL)
    low = tiny_wan_vae(2).to(torch.bfloat16)
    xl = x.to(torch.bfloat16)
    ref_l = _encode(low, xl).float()
    with apply_plan(low, uniform_plan(low, 3, sample_shape(xl, low), component=ENC)):
        out = _encode(low, xl).float()
    scale = ref_l.abs().max()
    assert (out - ref_l).abs().max() <= 0.02 * scale  # bf16 rounding, nothing more


def test_decode_and_encode_plans_at_once():
    """A VAE may carry an encode plan and a decode plan together (two hooks)."""
    vae = VAES["2.1"]
    x = _x(1, 5, 32, 16, seed=6)
    z = torch.randn(1, 4, 2, 4, 2)
    with torch.no_grad():
        ref_e, ref_d = vae.encode(x).latent_dist.parameters, vae.decode(z).sample
    with apply_plan(vae, uniform_plan(vae, 2, sample_shape(x, vae), component=ENC)), \
            apply_plan(vae, uniform_plan(vae, 3, sample_shape(z, vae))), torch.no_grad():
        torch.testing.assert_close(vae.encode(x).latent_dist.parameters, ref_e, **TOL)
        torch.testing.assert_close(vae.decode(z).sample, ref_d, **TOL)


def test_bad_input_is_refused():
    vae = VAES["2.2"]
    x = _x(1, 5, 32, 16)
    plan = uniform_plan(vae, 2, sample_shape(x, vae), component=ENC)
    with apply_plan(vae, plan):
        with pytest.raises(UnsupportedArgumentError, match="4n\\+1"):
            _encode(vae, _x(1, 6, 32, 16))
        with pytest.raises(UnsupportedArgumentError, match="3-channel"):
            _encode(vae, torch.randn(1, 12, 5, 32, 16))
        with pytest.raises(UnsupportedArgumentError, match="multiples of 16"):
            _encode(vae, _x(1, 5, 24, 16))
        with pytest.raises(PlanMismatchError):
            _encode(vae, _x(1, 9, 32, 16))  # another shape than the plan's
    vae.enable_tiling()
    try:
        with apply_plan(vae, plan), pytest.raises(UnsupportedArgumentError, match="disable_tiling"):
            _encode(vae, x)
    finally:
        vae.disable_tiling()
    with pytest.raises(PlanMismatchError):
        apply_plan(VAES["2.1"], plan)  # a plan for another VAE configuration


def test_plan_vae_encode():
    """``plan_vae(vae, video.shape, encode=True)`` on a Wan VAE: within budget, exact; bad shapes refused."""
    from vramplan.planner.gpus import find_gpu

    gpu = find_gpu("2080Ti").model_copy(update={"cuda_context_bytes": 0})
    vae = VAES["2.1"]
    x = _x(1, 5, 256, 16, seed=7)  # tall: the halo of one latent row is ~40 pixel rows
    ref = _encode(vae, x)
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    whole = vramplan.plan_vae(vae, x.shape, vram_gb=1.0, encode=True, gpu=gpu)
    assert whole.components[0].component == ENC and whole.components[0].shape.frames == 5
    original = whole.prediction.original_activation_peak_bytes
    plan = vramplan.plan_vae(vae, x.shape, vram_gb=(weights + 0.75 * original) / 0.98 / 2**30, encode=True, gpu=gpu)
    assert plan.components[0].slices.get("encoder.down_blocks", 1) > 1
    with apply_plan(vae, plan):
        torch.testing.assert_close(_encode(vae, x), ref, **TOL)
    with pytest.raises(InvalidArgumentError, match="4n\\+1"):
        vramplan.plan_vae(vae, (1, 3, 8, 256, 16), encode=True, gpu=gpu)
    with pytest.raises(InvalidArgumentError, match="encode=True"):
        vramplan.plan_vae(vae, (1, 3, 5, 256, 16), gpu=gpu)  # a video given to plan a decode


def test_backward_gradients_equal_the_stock_encode():
    """Gradients of the video and of a weight through the planned encode (checkpointing not needed)."""
    vae = VAES["2.2"]
    x = _x(1, 5, 64, 32, seed=8)

    def grads():
        xx = x.clone().requires_grad_(True)
        vae.zero_grad()
        out = vae.encode(xx).latent_dist.parameters
        (out * torch.linspace(0, 1, out.numel()).view(out.shape)).sum().backward()
        return xx.grad, vae.encoder.conv_in.weight.grad.clone()

    expected = grads()
    with apply_plan(vae, uniform_plan(vae, 3, sample_shape(x, vae), component=ENC)):
        got = grads()
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOL)
