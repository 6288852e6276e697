"""A stage may run under its own component plan (``vae_encoder`` on the pipeline's ``vae``, entry ``encode``)
while the attribute keeps its own (``vae``: the decode). SVD's conditioning-image encode is sliced along rows
that way: planned, checked against the profile, verified on meta tensors and run exactly."""

from __future__ import annotations

import json

import pytest
import torch
from vramplan.planner.errors import PlanFormatError, PlanIntegrityError
from vramplan.planner.pipelines import pipeline_spec
from vramplan.planner.schema import Plan, SampleShape

from vramplan import plan_for


@pytest.fixture(scope="module")
def laptop():
    """SVD within 1.9 GiB: the encode (1.41 GiB of activations whole) must be sliced."""
    return plan_for(gpu="RTX 3050 Laptop", model="svd", vram_gb=1.9)


def test_the_spec_names_the_encode_plan_and_its_attribute():
    spec = pipeline_spec("StableVideoDiffusionPipeline")
    assert spec.plan_name("encode_vae") == "vae_encoder" and spec.plan_name("decode") == "vae"
    assert spec.attribute_of("vae_encoder") == "vae" and spec.attribute_of("unet") == "unet"
    assert set(spec.sliced_components()) == {"image_encoder", "vae_encoder", "unet", "vae"}
    # one image in pixels; an fp16 VAE with force_upcast encodes in fp32, as the pipeline does
    shape = spec.stage_shape("encode_vae", 576, 1024, 14, True, "fp16", {"vae": {"force_upcast": True}})
    assert shape == SampleShape(batch=1, frames=1, latent_height=576, latent_width=1024, dtype="fp32")
    assert spec.stage_shape("encode_vae", 576, 1024, 14, True, "fp16", {"vae": {"force_upcast": False}}).dtype == "fp16"


def test_a_plan_slices_the_encode_under_its_own_component(laptop):
    enc, vae = laptop.component("vae_encoder"), laptop.component("vae")
    assert enc.attribute == "vae" and enc.module_name == "vae" and enc.resident == vae.resident
    assert enc.shape == SampleShape(batch=1, frames=1, latent_height=576, latent_width=1024, dtype="fp32")
    assert vae.shape.frames == 14 and enc.slices and not enc.streamed  # the upcast VAE's encoder never streams
    stage = next(s for s in laptop.stages if s.stage == "encode_vae")
    assert stage.component == "vae_encoder" and stage.peak_unit is not None
    assert stage.activation_bytes < stage.original_activation_bytes
    again = Plan.from_json(laptop.to_json())  # round-trips and agrees with the shipped profile
    from vramplan.planner.integrity import problems

    assert problems(again) == []


@pytest.mark.parametrize("model, frames", [("svd", 14), ("svd-xt", 25)])
def test_the_encode_no_longer_sets_the_floor(model, frames):
    from vramplan.planner.gpus import find_gpu
    from vramplan.planner.pipeline import PipelinePlanner
    from vramplan.planner.plan import shipped_pipeline_profile

    profile = shipped_pipeline_profile(model, 576, 1024, frames, True, "fp16", "flash")
    planner = PipelinePlanner(profile, find_gpu("2080Ti"), int(1.5 * 2**30), 25, "expandable_segments")
    total, stage, _ = planner.floor()
    assert stage != "encode_vae"


def test_an_older_plan_without_the_encode_plan_is_refused_clearly(laptop, tmp_path):
    data = json.loads(laptop.to_json())
    data["components"] = [c for c in data["components"] if c["component"] != "vae_encoder"]
    for st in data["stages"]:  # as plans made before: the encode stage under the vae
        if st["stage"] == "encode_vae":
            st["component"] = "vae"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanIntegrityError, match="has no vae_encoder: the plan was made before vramplan sliced the "
                                                 "encode_vae stage.*make a new plan"):
        Plan.load(path)


def test_an_edited_attribute_or_residency_is_refused(laptop, tmp_path):
    data = json.loads(laptop.to_json())
    next(c for c in data["components"] if c["component"] == "vae_encoder")["attribute"] = "unet"
    with pytest.raises(PlanFormatError, match="vae_encoder runs on the pipeline's 'unet', but "
                                              "StableVideoDiffusionPipeline runs it on 'vae'"):
        Plan.from_json(json.dumps(data))
    data = json.loads(laptop.to_json())
    enc = next(c for c in data["components"] if c["component"] == "vae_encoder")
    enc["resident"] = not enc["resident"]
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanIntegrityError, match=r"components\[vae_encoder\].resident"):
        Plan.load(path)


def test_the_encode_plan_verifies_on_meta_tensors(laptop):
    from vramplan.runtime.verify import _build, _run

    comp = laptop.component("vae_encoder")
    report = _run(laptop, comp, _build(laptop, comp))
    assert report.predicted_activation_bytes is not None and abs(report.error) < 0.01
    assert not report.unsliced


# -- running it ---------------------------------------------------------------------------------------
SIZE, FRAMES = 32, 5


def _plan_with_encode(pipe, k: int, dtype: str) -> Plan:
    from vramplan.runtime import uniform_pipeline_plan
    from vramplan.runtime.apply import uniform_component

    plan = uniform_pipeline_plan(pipe, 2, SIZE, SIZE, FRAMES)
    enc = uniform_component(pipe.vae, k, SampleShape(batch=1, frames=1, latent_height=SIZE, latent_width=SIZE,
                                                     dtype=dtype), component="vae_encoder")
    # the CLIP image encoder planned too: nothing sliced (257 tokens), its second layer streamed
    clip = uniform_component(pipe.image_encoder, 1, SampleShape(batch=1, frames=1, latent_height=224, latent_width=224,
                                                                dtype="fp32"))
    clip = clip.model_copy(update={"streamed": ["vision_model.encoder.layers.1"]})
    mine = {"vae_encoder": enc.model_copy(update={"attribute": "vae"}), "image_encoder": clip}
    assert {"vae_encoder", "image_encoder"} <= {c.component for c in plan.components}  # uniform plans have them too
    return plan.model_copy(update={"components": [mine.get(c.component, c) for c in plan.components]})


def _call(pipe, image, plan=None):
    from vramplan.runtime.runner import run

    kw = dict(image=image, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    if plan is None:
        return pipe(height=SIZE, width=SIZE, num_frames=FRAMES, decode_chunk_size=FRAMES, **kw).frames, None
    result = run(plan, pipe=pipe, progress=False, **kw)
    return result.frames, result.report


def test_run_slices_the_encode_exactly_and_leaves_no_hook(pipe, image):
    from vramplan.runtime.hooks import hooks_on

    expected, _ = _call(pipe, image)
    whole = _call(pipe, image, _plan_with_encode(pipe, 1, "fp32"))[1]
    frames, report = _call(pipe, image, _plan_with_encode(pipe, 4, "fp32"))
    torch.testing.assert_close(frames, expected, rtol=1e-5, atol=1e-5)
    by_stage = {s.stage: s for s in report.stages}
    assert by_stage["encode_vae"].calls == 1 and by_stage["encode_image"].calls == 1
    assert any(n.startswith("image_encoder: 1 blocks streamed") for n in report.notes)
    assert by_stage["encode_vae"].peak_bytes < {s.stage: s for s in whole.stages}["encode_vae"].peak_bytes
    assert not [name for name in hooks_on(pipe.vae) if name.startswith("vramplan")]


def test_run_slices_the_upcast_fp16_encode(image):
    """An fp16 VAE with force_upcast: the pipeline converts it to fp32 in place around the encode; the
    encode plan (fp32) follows. The UNet stays fp32 and the latents are returned (fast on a CPU)."""
    from vramplan.runtime.runner import run
    from vramplan.runtime.tiny import tiny_svd_pipeline

    pipe = tiny_svd_pipeline()
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    kw = dict(image=image, num_inference_steps=1, output_type="latent")
    expected = pipe(height=SIZE, width=SIZE, num_frames=FRAMES, generator=torch.Generator().manual_seed(0), **kw).frames
    plan = _plan_with_encode(pipe, 3, "fp32")
    plan = plan.model_copy(update={"components": [c for c in plan.components if c.component == "vae_encoder"]})
    result = run(plan, pipe=pipe, progress=False, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(result.frames, expected, rtol=1e-5, atol=1e-5)
    assert pipe.vae.dtype == torch.float16
