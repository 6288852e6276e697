"""``vramplan.plan_vae``: a plan for one VAE call within a budget, exact under ``apply_plan``."""

from __future__ import annotations

import pytest
import torch
from vramplan.planner.errors import InfeasibleError, InvalidArgumentError, UnsupportedArgumentError
from vramplan.planner.gpus import find_gpu
from vramplan.runtime import apply_plan
from vramplan.runtime.tiny import TINY_VAE, randomize_norms

import vramplan

TOL = dict(rtol=1e-5, atol=1e-5)
# A tiny model's memory is kilobytes: plan for a GPU without a CUDA context so the budget is all activations.
GPU = find_gpu("2080Ti").model_copy(update={"cuda_context_bytes": 0})


def _sd_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    cfg = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8)
    return randomize_norms(AutoencoderKL(**cfg), 1).eval()


@pytest.fixture(scope="module")
def sd_vae():
    return _sd_vae()


def _budget(vae, fraction: float, original: int) -> float:
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    return (weights + original * fraction) / 0.98 / 2**30


def test_encode_plan_fits_and_is_exact(sd_vae):
    x = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = sd_vae.encode(x).latent_dist.parameters
    whole = vramplan.plan_vae(sd_vae, x.shape, vram_gb=1.0, encode=True, gpu=GPU)
    original = whole.prediction.original_activation_peak_bytes
    plan = vramplan.plan_vae(sd_vae, x.shape, vram_gb=_budget(sd_vae, 0.3, original), encode=True, gpu=GPU)
    assert plan.components[0].component == "vae_encoder"
    assert plan.prediction.activation_peak_bytes < 0.5 * original
    assert any(g.axis == "rows" for g in plan.components[0].groups) or plan.components[0].slices
    with apply_plan(sd_vae, plan), torch.no_grad():
        out = sd_vae.encode(x).latent_dist.parameters
    torch.testing.assert_close(out, ref, **TOL)


def test_svd_decode_plan_is_exact():
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(0)
    vae = randomize_norms(AutoencoderKLTemporalDecoder(**TINY_VAE), 3).eval()
    z = torch.randn(1, 5, 4, 8, 6, generator=torch.Generator().manual_seed(1))  # [B, T, C, h, w] as SVD holds them
    flat = z.flatten(0, 1)
    with torch.no_grad():
        ref = vae.decode(flat, num_frames=5).sample
    whole = vramplan.plan_vae(vae, z.shape, vram_gb=1.0, gpu=GPU)
    plan = vramplan.plan_vae(vae, z.shape, vram_gb=_budget(vae, 0.5, whole.prediction.original_activation_peak_bytes),
                             gpu=GPU)
    assert plan.components[0].slices
    with apply_plan(vae, plan), torch.no_grad():
        out = vae.decode(flat, num_frames=5).sample
    torch.testing.assert_close(out, ref, **TOL)


def test_bad_input(sd_vae):
    with pytest.raises(InvalidArgumentError, match="4-channel"):
        vramplan.plan_vae(sd_vae, (1, 16, 8, 8), gpu=GPU)
    with pytest.raises(InvalidArgumentError, match="give"):
        vramplan.plan_vae(sd_vae, (4, 8, 8), gpu=GPU)
    sd_vae.enable_tiling()
    try:
        with pytest.raises(UnsupportedArgumentError, match="disable_tiling"):
            vramplan.plan_vae(sd_vae, (1, 4, 8, 8), gpu=GPU)
    finally:
        sd_vae.disable_tiling()
    # above the weights, below the smallest slice of some unit: the error names the unit and the bytes
    with pytest.raises(InfeasibleError, match=r"set by encoder\.[\w.]+.*iB"):
        vramplan.plan_vae(sd_vae, (1, 3, 64, 48), vram_gb=_budget(sd_vae, 0.01, 10**6), encode=True, gpu=GPU)


def test_wan_decode_plan_is_exact():
    from tiny import tiny_wan_vae

    vae = tiny_wan_vae()
    # Wan latents: [B, C, T, h, w]; big enough that the allocator model's rounding does not dominate
    z = torch.randn(1, 4, 2, 10, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = vae.decode(z).sample
    whole = vramplan.plan_vae(vae, z.shape, vram_gb=1.0, gpu=GPU)
    assert whole.components[0].shape.frames == 2
    plan = vramplan.plan_vae(vae, z.shape, vram_gb=_budget(vae, 0.5, whole.prediction.original_activation_peak_bytes),
                             gpu=GPU)
    assert max(plan.components[0].slices.values(), default=1) > 1  # an up block sliced
    with apply_plan(vae, plan), torch.no_grad():
        out = vae.decode(z).sample
    torch.testing.assert_close(out, ref, **TOL)
    with pytest.raises(InvalidArgumentError, match="4-channel"):
        vramplan.plan_vae(vae, (1, 16, 3, 10, 6), gpu=GPU)  # z16 latents for a z4 VAE
    with pytest.raises(InvalidArgumentError, match=r"\[B, C, T, h, w\]"):
        vramplan.plan_vae(vae, (3, 4, 10, 6), gpu=GPU)
