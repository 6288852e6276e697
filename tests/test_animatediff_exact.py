"""The planned AnimateDiff ``UNetMotionModel`` forward equals the original (fp32, 1e-5) for any plan."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plans import random_plans
from vramplan.planner.errors import UnsupportedArgumentError
from vramplan.planner.schema import SampleShape
from vramplan.runtime import MemoryTracker, apply_plan, empty_model, fingerprint, list_units, uniform_plan
from vramplan.runtime.adapters import animatediff_unet  # registers the adapter
from vramplan.runtime.adapters.animatediff_unet import AnimateDiffUNetAdapter
from vramplan.runtime.tiny import TINY_MOTION_UNET

TOL = dict(rtol=1e-5, atol=1e-5)

AD_TINY = TINY_MOTION_UNET

# The other branches: no motion mid block, linear projections, two temporal layers per motion
# module, two resnets per block, SDXL-style text_time embedding and a timestep condition.
AD_VARIANT = dict(
    AD_TINY,
    down_block_types=("DownBlockMotion", "CrossAttnDownBlockMotion"),
    up_block_types=("CrossAttnUpBlockMotion", "UpBlockMotion"),
    layers_per_block=2,
    use_motion_mid_block=False,
    use_linear_projection=True,
    temporal_transformer_layers_per_block=2,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=8 + 6 * 4,
    time_cond_proj_dim=8,
)


def tiny_motion_unet(seed: int = 0, **config):
    from diffusers import UNetMotionModel

    torch.manual_seed(seed)
    unet = UNetMotionModel(**(config or AD_TINY)).eval()
    with torch.no_grad():  # random, non-trivial norm affines so every statistic matters
        for name, p in unet.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return unet


def motion_inputs(unet, batch=1, frames=5, height=8, width=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, unet.config.in_channels, frames, height, width, generator=g)
    ehs = torch.randn(batch * frames, 7, unet.config.cross_attention_dim, generator=g)
    return [sample, torch.tensor(3), ehs]


def shape_of(sample: torch.Tensor) -> SampleShape:
    b, _, t, h, w = sample.shape
    return SampleShape(batch=b, frames=t, latent_height=h, latent_width=w, dtype="fp32")


def _run(unet, inputs, **kwargs):
    with torch.no_grad():
        return unet(*inputs, **kwargs).sample


@pytest.fixture(scope="module")
def unet():
    return tiny_motion_unet()


@pytest.mark.parametrize("batch,frames,height,width", [(1, 5, 8, 8), (2, 3, 9, 7), (2, 7, 5, 11)])
@pytest.mark.parametrize("k,group", [(2, False), (3, True), (4, False), (64, True)])
def test_uniform_plan_matches_original(unet, batch, frames, height, width, k, group):
    inputs = motion_inputs(unet, batch=batch, frames=frames, height=height, width=width)
    expected = _run(unet, inputs)
    plan = uniform_plan(unet, k, shape_of(inputs[0]), group=group)
    with apply_plan(unet, plan):
        got = _run(unet, inputs)
    assert got.shape == expected.shape == (batch, 4, frames, height, width)
    assert got.stride() == expected.stride()
    torch.testing.assert_close(got, expected, **TOL)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    batch=st.sampled_from([1, 2]),
    frames=st.integers(1, 7),
    height=st.integers(3, 11),
    width=st.integers(3, 11),
)
def test_random_plans_match_original(unet, data, batch, frames, height, width):
    inputs = motion_inputs(unet, batch=batch, frames=frames, height=height, width=width, seed=frames)
    shape = shape_of(inputs[0])
    plan = data.draw(random_plans(list_units(unet), fingerprint(unet), shape))
    expected = _run(unet, inputs)
    with apply_plan(unet, plan):
        got = _run(unet, inputs)
    torch.testing.assert_close(got, expected, **TOL)


def test_units_and_axes(unet):
    units = {u.name: u for u in list_units(unet)}
    motion = [u for u in units.values() if ".motion_modules." in u.name]
    assert len(motion) == 7  # down 1+1, mid 1, up 2+2
    assert all(u.axis == "tokens" and u.needs_input_stats for u in motion)
    assert all(u.axis == "frames" and not u.needs_input_stats for u in units.values() if u not in motion)
    assert {
        "conv_in",
        "down_blocks.0.attentions.0.transformer_blocks.0",
        "mid_block.motion_modules.0",
        "up_blocks.0.upsamplers.0",
        "up_blocks.1.resnets.1",
        "conv_norm_out",
    } <= set(units)


def test_plan_really_slices_each_unit(unet):
    """Every sliced unit runs once per slice (+1 statistics pass): the plan is executed, not ignored."""
    inputs = motion_inputs(unet, batch=2, frames=5, height=8, width=8)
    plan = uniform_plan(unet, 3, shape_of(inputs[0]), group=True)
    with apply_plan(unet, plan), MemoryTracker() as tracker, torch.no_grad():
        unet(*inputs)
    for unit in list_units(unet):
        assert tracker.units[unit.name].calls == 3 + unit.needs_input_stats, unit.name


def test_k_beyond_the_axis_is_one_element_per_slice(unet):
    inputs = motion_inputs(unet, batch=1, frames=2, height=4, width=4)
    expected = _run(unet, inputs)
    plan = uniform_plan(unet, 1000, shape_of(inputs[0]))
    with apply_plan(unet, plan), MemoryTracker() as tracker:
        got = _run(unet, inputs)
    torch.testing.assert_close(got, expected, **TOL)
    assert tracker.units["conv_in"].calls == 2  # B*T frames
    assert tracker.units["down_blocks.0.motion_modules.0"].calls == 16 + 1  # 4x4 tokens + stats


def test_remove_restores_bit_identical_forward(unet):
    inputs = motion_inputs(unet, batch=2, frames=3, height=6, width=6)
    before = _run(unet, inputs)
    forward_before = unet.forward
    handle = apply_plan(unet, uniform_plan(unet, 2, shape_of(inputs[0])))
    assert unet.forward is handle
    handle.remove()
    handle.remove()  # idempotent
    assert "forward" not in unet.__dict__
    assert unet.forward == forward_before
    assert torch.equal(_run(unet, inputs), before)


def test_forward_arguments(unet):
    """Python timesteps, return_dict=False, cross_attention_kwargs={}, ControlNet residuals, FreeU."""
    inputs = motion_inputs(unet, batch=2, frames=3, height=9, width=7)
    plan = uniform_plan(unet, 2, shape_of(inputs[0]))
    for timestep in (7, 7.5):
        args = [inputs[0], timestep, inputs[2]]
        with torch.no_grad():
            expected = unet(*args, return_dict=False)
            with apply_plan(unet, plan):
                got = unet(*args, return_dict=False, cross_attention_kwargs={})
        assert isinstance(got, tuple) and len(got) == 1
        torch.testing.assert_close(got[0], expected[0], **TOL)

    # down/mid residuals of the right shapes, as a ControlNet (or SparseCtrl) gives them
    shapes = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: shapes.append(out.shape))]
    hooks += [
        b.register_forward_hook(lambda m, a, out: shapes.extend(s.shape for s in out[1]))
        for b in unet.down_blocks
    ]
    _run(unet, inputs)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(5)
    down = tuple(torch.randn(s, generator=g) for s in shapes)
    mid = torch.randn(shapes[-1], generator=g)
    extra = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    expected = _run(unet, inputs, **extra)
    with apply_plan(unet, plan):
        torch.testing.assert_close(_run(unet, inputs, **extra), expected, **TOL)

    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        expected = _run(unet, inputs)
        with apply_plan(unet, uniform_plan(unet, 3, shape_of(inputs[0]))):
            torch.testing.assert_close(_run(unet, inputs), expected, **TOL)
    finally:
        unet.disable_freeu()


def test_variant_config_and_conditioning():
    unet = tiny_motion_unet(**AD_VARIANT)
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    g = torch.Generator().manual_seed(2)
    inputs = motion_inputs(unet, batch=2, frames=3, height=9, width=7)
    extra = dict(
        timestep_cond=torch.randn(2, 8, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, 8, generator=g),
            "time_ids": torch.rand(2, 6, generator=g) * 9,
        },
    )
    expected = _run(unet, inputs, **extra)
    for k, group in ((2, False), (3, True)):
        with apply_plan(unet, uniform_plan(unet, k, shape_of(inputs[0]), group=group)):
            torch.testing.assert_close(_run(unet, inputs, **extra), expected, **TOL)


def test_ip_adapter_image_embeds():
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    unet = tiny_motion_unet()
    torch.manual_seed(3)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(image_embed_dim=8, cross_attention_dim=16, num_image_text_embeds=2)]
    )
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith("attn2") and "motion_modules" not in name:
            module.set_processor(
                IPAdapterAttnProcessor2_0(module.to_k.out_features, 16, num_tokens=(2,), scale=0.7)
            )
    inputs = motion_inputs(unet, batch=2, frames=3, height=6, width=5)
    extra = dict(added_cond_kwargs={"image_embeds": [torch.randn(2, 1, 8)]})
    expected = _run(unet, inputs, **extra)
    with apply_plan(unet, uniform_plan(unet, 2, shape_of(inputs[0]))):
        torch.testing.assert_close(_run(unet, inputs, **extra), expected, **TOL)


def test_unsupported_arguments_say_so(unet, monkeypatch):
    inputs = motion_inputs(unet, batch=1, frames=3, height=6, width=6)
    expected = _run(unet, inputs, cross_attention_kwargs={"scale": 0.5})  # no LoRA layers: ignored
    with apply_plan(unet, uniform_plan(unet, 2, shape_of(inputs[0]))):
        torch.testing.assert_close(_run(unet, inputs, cross_attention_kwargs={"scale": 0.5}), expected, **TOL)
        with pytest.raises(UnsupportedArgumentError, match="attention_mask"):
            unet(*inputs, attention_mask=torch.ones(3, 7))
        monkeypatch.setattr(animatediff_unet, "_has_lora_layers", lambda model: True)
        with pytest.raises(UnsupportedArgumentError, match="LoRA"):
            unet(*inputs, cross_attention_kwargs={"scale": 0.5})
        with pytest.raises(ValueError, match="one tensor per skip"):
            unet(*inputs, down_block_additional_residuals=(inputs[0],))
        with pytest.raises(ValueError, match="batch\\*frames"):
            unet(inputs[0], inputs[1], inputs[2][:1])


def test_meta_model_traces():
    """The profiler's path: a weightless model on meta tensors, inputs from ``example_inputs``."""
    from diffusers import UNetMotionModel

    unet = empty_model(UNetMotionModel, AD_TINY, torch.float16)
    shape = SampleShape(batch=2, frames=4, latent_height=9, latent_width=12, dtype="fp16")
    args = AnimateDiffUNetAdapter().example_inputs(unet, shape, device="meta")
    with apply_plan(unet, uniform_plan(unet, 3, shape)), torch.no_grad():
        out = unet(*args).sample
    assert out.device.type == "meta" and out.shape == (2, 4, 4, 9, 12) and out.dtype == torch.float16
