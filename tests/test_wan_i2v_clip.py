"""Wan 2.1 I2V's CLIP image encoder is a planned stage (``encode_image`` through the CLIP vision adapter, as
SVD's): its layers stream, the stock ``encode_image`` (``output_hidden_states=True``, ``hidden_states[-2]``)
runs exactly under the plan, and a plan without it is flagged. Wan 2.2 I2V-A14B has no image encoder."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_wan_i2v, tiny_wan_i2v_call
from vramplan.planner.pipelines import pipeline_spec
from vramplan.planner.schema import SampleShape

from vramplan import plan_for


def test_the_2_1_spec_plans_the_image_encoder_and_the_2_2_spec_has_none():
    spec = pipeline_spec("WanImageToVideoPipeline")
    assert "image_encoder" in spec.sliced_components()
    # one image at the encoder's input size, pixels, in the pipeline's dtype
    assert spec.stage_shape("encode_image", 720, 1280, 81, True, "bf16", {"image_encoder": {"image_size": 224}}) \
        == SampleShape(batch=1, frames=1, latent_height=224, latent_width=224, dtype="bf16")
    a14b = pipeline_spec("WanImageToVideoPipeline:A14B")
    assert "image_encoder" not in a14b.sliced_components()
    assert "encode_image" not in {s for s, _, _ in a14b.stages}


def test_the_shipped_720p_plan_has_the_image_encoder_and_a_plan_without_it_is_flagged():
    from vramplan.planner.integrity import problems
    from vramplan.runtime.verify import missing_components

    plan = plan_for(gpu="RTX 4090", model="wan2.1-i2v-14b", height=720, width=1280, frames=81, vram_gb=6,
                    host_ram_gb=256)
    clip = plan.component("image_encoder")
    assert clip.shape == SampleShape(batch=1, frames=1, latent_height=224, latent_width=224, dtype="bf16")
    stage = next(s for s in plan.stages if s.stage == "encode_image")
    assert stage.peak_unit is not None  # priced unit by unit, not as a whole stage
    assert plan.prediction.peak_bytes <= 6 * 2**30 and problems(plan) == []
    # both shipped profiles: one streamable block per ViT-H layer (at 6 GiB the planner needs none streamed)
    from importlib import resources

    from vramplan.planner.schema import PipelineProfile

    for size in ("480x832", "720x1280"):
        name = f"wan2.1-i2v-14b-{size}-f81-cfg-bf16-flash.pipeline.json"
        prof = PipelineProfile.model_validate_json(resources.files("vramplan.profiles").joinpath("models", name)
                                                   .read_text())
        encode = next(s for s in prof.stages if s.stage == "encode_image").profile
        assert set(encode.block_weights) == {f"vision_model.encoder.layers.{i}" for i in range(32)}
    bad = plan.model_copy(update={"components": [c for c in plan.components if c.component != "image_encoder"]})
    assert missing_components(bad) == ["image_encoder"]
    assert any("image_encoder" in p for p in problems(bad))


# ---------------------------------------------------------------------- a tiny Wan 2.1 I2V pipeline, run
@pytest.mark.parametrize(("projection", "streamed"), [
    (False, ["encoder.layers.1"]), (False, ["encoder.layers.0", "encoder.layers.2"]),
    (True, ["vision_model.encoder.layers.1"])])
def test_a_planned_2_1_i2v_run_with_the_clip_layers_streamed_equals_the_stock_pipeline(projection, streamed):
    from vramplan.planner.schema import Plan
    from vramplan.runtime import run
    from vramplan.runtime.apply import sample_shape, uniform_component
    from vramplan.runtime.hooks import hooks_on

    pipe = tiny_wan_i2v("projection" if projection else "plain")
    with torch.no_grad():
        expected = pipe(**tiny_wan_i2v_call(), generator=torch.Generator().manual_seed(3)).frames
    spec = pipeline_spec("WanImageToVideoPipeline")
    configs = {"image_encoder": pipe.image_encoder.config.to_dict()}
    clip = uniform_component(pipe.image_encoder, 1, spec.stage_shape("encode_image", 32, 48, 5, True, "fp32", configs))
    latents = torch.zeros(1, 16, 2, 4, 6)
    enc = uniform_component(pipe.vae, 4, sample_shape(torch.zeros(1, 3, 5, 32, 48), pipe.vae), component="vae_encoder")
    plan = Plan(pipeline="WanImageToVideoPipeline", model_name="tiny-wan-i2v", height=32, width=48, frames=5,
                components=[uniform_component(pipe.transformer, 2, sample_shape(latents, pipe.transformer)),
                            uniform_component(pipe.vae, 3, sample_shape(latents, pipe.vae)),
                            enc.model_copy(update={"attribute": "vae"}),
                            clip.model_copy(update={"streamed": streamed})])
    result = run(plan, pipe=pipe, progress=False, **tiny_wan_i2v_call(), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(result.frames, expected, rtol=1e-5, atol=1e-5)
    calls = {s.stage: s.calls for s in result.report.stages}
    assert calls["encode_image"] == 1 and calls["encode_vae"] == 1
    assert any(n.startswith(f"image_encoder: {len(streamed)} blocks streamed") for n in result.report.notes)
    assert not [name for name in hooks_on(pipe.image_encoder) if name.startswith("vramplan")]


def test_the_image_embeddings_matter_in_the_tiny_pipeline():
    """The exactness above is not vacuous: another image encoder changes the frames."""
    pipe = tiny_wan_i2v("plain")
    with torch.no_grad():
        before = pipe(**tiny_wan_i2v_call(), generator=torch.Generator().manual_seed(3)).frames
        for p in pipe.image_encoder.encoder.layers[-2].parameters():  # feeds hidden_states[-2]
            p.add_(0.5)
        after = pipe(**tiny_wan_i2v_call(), generator=torch.Generator().manual_seed(3)).frames
    assert (before - after).abs().max() > 1e-4
