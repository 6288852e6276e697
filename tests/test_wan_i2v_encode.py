"""The Wan image-to-video pipelines VAE-encode a conditioning video (the image, then zeros): that encode is a
sliced stage under its own plan (``vae_encoder`` on the pipeline's ``vae``), planned from the shipped
profiles, and run exactly inside the stock ``WanImageToVideoPipeline`` call."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_wan_i2v, tiny_wan_i2v_call
from vramplan.planner.pipelines import pipeline_spec
from vramplan.planner.schema import SampleShape

from vramplan import plan_for


@pytest.mark.parametrize("name", ["WanImageToVideoPipeline", "WanImageToVideoPipeline:A14B"])
def test_the_i2v_specs_slice_the_encode_under_its_own_plan(name):
    spec = pipeline_spec(name)
    assert spec.plan_name("encode_vae") == "vae_encoder" and spec.attribute_of("vae_encoder") == "vae"
    assert "vae_encoder" in spec.sliced_components()
    # the video in pixels, all its frames (4n+1), in the pipeline's dtype
    assert spec.stage_shape("encode_vae", 720, 1280, 81, True, "bf16") == SampleShape(
        batch=1, frames=81, latent_height=720, latent_width=1280, dtype="bf16")


def test_i2v_a14b_plans_within_6_gib_with_the_encode_sliced():
    plan = plan_for(gpu="RTX 4090", model="wan2.2-i2v-a14b", height=720, width=1280, frames=81, dtype="bf16",
                    vram_gb=6, host_ram_gb=256)
    enc = plan.component("vae_encoder")
    assert enc.attribute == "vae" and enc.shape.frames == 81 and max(enc.slices.values()) > 1
    assert plan.prediction.peak_bytes <= 6 * 2**30
    from vramplan.planner.integrity import problems

    assert problems(plan) == []


# ---------------------------------------------------------------------- a tiny I2V pipeline, run
def test_a_planned_i2v_run_with_the_encode_sliced_equals_the_stock_pipeline():
    from vramplan.planner.schema import Plan
    from vramplan.runtime import run
    from vramplan.runtime.apply import sample_shape, uniform_component

    pipe = tiny_wan_i2v()
    with torch.no_grad():
        expected = pipe(**tiny_wan_i2v_call(), generator=torch.Generator().manual_seed(3)).frames
    latents = torch.zeros(1, 16, 2, 4, 6)
    video = torch.zeros(1, 3, 5, 32, 48)
    enc = uniform_component(pipe.vae, 4, sample_shape(video, pipe.vae), component="vae_encoder")
    plan = Plan(pipeline="WanImageToVideoPipeline", model_name="tiny-wan-i2v", height=32, width=48, frames=5,
                components=[uniform_component(pipe.transformer, 2, sample_shape(latents, pipe.transformer)),
                            uniform_component(pipe.vae, 3, sample_shape(latents, pipe.vae)),
                            enc.model_copy(update={"attribute": "vae"})])
    result = run(plan, pipe=pipe, progress=False, **tiny_wan_i2v_call(), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(result.frames, expected, rtol=1e-5, atol=1e-5)
    assert {s.stage: s.calls for s in result.report.stages}["encode_vae"] == 1
