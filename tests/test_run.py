"""run(plan) on a tiny SVD pipeline built in code: the same frames as the original pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from vramplan.planner.errors import PlanMismatchError, UnsupportedModelError, VramplanError
from vramplan.planner.schema import Plan
from vramplan.runtime import uniform_pipeline_plan
from vramplan.runtime.runner import load_pipeline, run, save_video
from vramplan.runtime.tiny import tiny_svd_pipeline

SIZE, FRAMES = 32, 5


@pytest.fixture(scope="module")
def pipe():
    return tiny_svd_pipeline()


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype("uint8"))


def _original(pipe, image, **kw):
    out = pipe(image=image, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=2, decode_chunk_size=FRAMES,
               output_type="pt", generator=torch.Generator().manual_seed(0), **kw)
    return out.frames


@pytest.mark.parametrize("k", [2, 5])
def test_run_equals_the_original_pipeline(pipe, image, k):
    expected = _original(pipe, image)
    plan = uniform_pipeline_plan(pipe, k, SIZE, SIZE, FRAMES)
    result = run(plan, pipe=pipe, image=image, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0), progress=False)
    torch.testing.assert_close(result.frames, expected, rtol=1e-5, atol=1e-5)
    report = result.report
    assert [s.stage for s in report.stages] == ["encode_image", "encode_vae", "denoise", "decode"]
    assert report.stages[2].calls == 2 and len(report.step_seconds) == 2
    assert report.tracker_peak_bytes > 0 and report.device == "cpu"
    # Everything is restored: the pipeline runs as before, bit for bit.
    assert torch.equal(_original(pipe, image), expected)
    assert "forward" not in pipe.unet.__dict__ and "decode" not in pipe.vae.__dict__


def test_the_plan_really_slices_the_decoder(pipe, image):
    """The sliced decode needs less than the unsliced one (tracker peaks per stage)."""
    one = run(uniform_pipeline_plan(pipe, 1, SIZE, SIZE, FRAMES), pipe=pipe, image=image, num_inference_steps=1,
              output_type="pt", progress=False).report
    many = run(uniform_pipeline_plan(pipe, 5, SIZE, SIZE, FRAMES), pipe=pipe, image=image, num_inference_steps=1,
               output_type="pt", progress=False).report
    assert many.stages[3].peak_bytes < one.stages[3].peak_bytes


def test_a_call_for_another_size_is_refused(pipe, image):
    plan = uniform_pipeline_plan(pipe, 2, SIZE, SIZE, FRAMES)
    with pytest.raises(PlanMismatchError, match="the plan is for 5 frames at 32x32, but the call asks for num_frames=7"):
        run(plan, pipe=pipe, image=image, num_frames=7)


def test_pipeline_without_adapter(image):
    class OtherPipeline:
        pass

    plan = Plan.model_validate(uniform_pipeline_plan(tiny_svd_pipeline(), 2, SIZE, SIZE, FRAMES).model_dump())
    with pytest.raises(UnsupportedModelError, match="StableVideoDiffusionPipeline"):
        run(plan, pipe=OtherPipeline(), image=image)


def test_missing_weights_say_which_files_and_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    from vramplan import plan_for

    plan = plan_for(gpu="2080Ti", model="svd")
    with pytest.raises(VramplanError, match=r"(?s)stable-video-diffusion-img2vid.*Missing: model_index.json.*huggingface-cli download"):
        load_pipeline(plan)


def test_save_video(tmp_path, pipe, image):
    result = run(uniform_pipeline_plan(pipe, 2, SIZE, SIZE, FRAMES), pipe=pipe, image=image, num_inference_steps=1,
                 progress=False)
    path = save_video(result.frames, tmp_path / "v.gif")
    assert path.stat().st_size > 0
    frames = Image.open(path)
    assert frames.n_frames == FRAMES


def test_animatediff_run_equals_the_original_pipeline():
    from vramplan.runtime.tiny import tiny_animatediff_pipeline

    pipe = tiny_animatediff_pipeline()
    g = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 7, 16, generator=g), negative_prompt_embeds=torch.randn(1, 7, 16, generator=g))
    kwargs = dict(num_inference_steps=2, output_type="pt", **embeds)
    expected = pipe(height=32, width=32, num_frames=5, decode_chunk_size=5, generator=torch.Generator().manual_seed(0),
                    **kwargs).frames
    result = run(uniform_pipeline_plan(pipe, 3, 32, 32, 5), pipe=pipe, generator=torch.Generator().manual_seed(0),
                 progress=False, **kwargs)
    torch.testing.assert_close(result.frames, expected, rtol=1e-5, atol=1e-5)
    assert [s.stage for s in result.report.stages] == ["encode_text", "denoise", "decode"]
    assert result.report.stages[1].calls == 2 and result.report.stages[2].calls == 1
