"""run(plan) on a tiny SVD pipeline built in code: the same frames as the original pipeline."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from vramplan.planner.errors import PlanMismatchError, UnsupportedModelError, VramplanError
from vramplan.planner.schema import Plan
from vramplan.runtime import uniform_pipeline_plan
from vramplan.runtime.runner import load_pipeline, run, save_video
from vramplan.runtime.tiny import tiny_svd_pipeline

SIZE, FRAMES = 32, 5


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


# ---------------------------------------------------------------------------------- restoration (issue 7)
def _plain_state(pipe):
    return {
        "progress": dict(pipe._progress_bar_config),
        "devices": {n: m.device for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)},
        "instance": {n: sorted(k for k in ("forward", "decode", "_vramplan_hooks") if k in m.__dict__)
                     for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)},
    }


def test_run_restores_everything_when_the_pipeline_raises(pipe, image):
    from vramplan.runtime.hooks import hooks_on

    pipe.set_progress_bar_config(disable=True, desc="mine")
    before = _plain_state(pipe)
    seen = []

    def boom(pipe_, i, t, kwargs):
        seen.append(hooks_on(pipe_.unet))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(uniform_pipeline_plan(pipe, 2, SIZE, SIZE, FRAMES), pipe=pipe, image=image, num_inference_steps=2,
            output_type="pt", callback_on_step_end=boom, progress=True)
    assert seen == [["vramplan.plan", "vramplan.timer.denoise"]]  # the timers are registry hooks
    assert _plain_state(pipe) == before
    assert pipe._progress_bar_config == {"disable": True, "desc": "mine"}


def test_run_keeps_and_calls_the_users_accelerate_hooks(pipe, image):
    """A hook installed by the user (``enable_model_cpu_offload``'s on the UNet, any on a submodule) fires
    during the run and is still there afterwards."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import CpuOffload, ModelHook, add_hook_to_module, remove_hook_from_module

    calls = []

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append("decoder")
            return args, kwargs

    _, offload = cpu_offload_with_hook(pipe.unet, execution_device="cpu")
    add_hook_to_module(pipe.vae.decoder.conv_out, Counting())
    pre = CpuOffload.pre_forward
    try:
        CpuOffload.pre_forward = lambda self, m, *a, **kw: calls.append("unet") or pre(self, m, *a, **kw)
        result = run(uniform_pipeline_plan(pipe, 2, SIZE, SIZE, FRAMES), pipe=pipe, image=image,
                     num_inference_steps=2, output_type="pt", progress=False)
        assert calls.count("unet") == 2 and calls.count("decoder") >= 1
        assert isinstance(pipe.unet._hf_hook, CpuOffload) and isinstance(pipe.vae.decoder.conv_out._hf_hook, Counting)
        assert any("unet keeps the accelerate hook" in n for n in result.report.notes)
    finally:
        CpuOffload.pre_forward = pre
        offload.remove()
        remove_hook_from_module(pipe.vae.decoder.conv_out)


def test_offload_hooks_of_run_leave_the_users_submodule_hooks(pipe):
    """The offload hooks run() adds on CUDA (exercised here on the CPU) are removed alone."""
    from contextlib import ExitStack

    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
    from vramplan.runtime.runner import _residency

    plan = uniform_pipeline_plan(pipe, 2, SIZE, SIZE, FRAMES)
    for comp in plan.components:
        comp.resident = False
    add_hook_to_module(pipe.unet.conv_in, ModelHook())
    try:
        notes = []
        with ExitStack() as stack:
            hooks = _residency(pipe, plan, torch.device("cpu"), stack, notes, offload=True)
            assert set(hooks) == {"unet", "vae", "image_encoder"} and hasattr(pipe.unet, "_hf_hook")
        assert not hasattr(pipe.unet, "_hf_hook") and not hasattr(pipe.vae, "_hf_hook")
        assert hasattr(pipe.unet.conv_in, "_hf_hook")  # the user's
    finally:
        remove_hook_from_module(pipe.unet.conv_in)


@pytest.mark.parametrize("before", ["", "expandable_segments:True"])
def test_the_allocator_setting_is_switched_back_also_after_a_failure(monkeypatch, before):
    from vramplan.runtime import runner

    state = {"settings": before}
    calls = []

    def setter(value):
        calls.append(value)
        state["settings"] = value

    monkeypatch.setattr(runner, "_set_allocator_settings", setter)
    monkeypatch.setattr(runner, "_get_allocator_settings", lambda: state["settings"])
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    notes = []
    with pytest.raises(RuntimeError), runner.allocator_setting(notes) as setting:
        assert setting == "expandable_segments:True" and state["settings"] == setting
        raise RuntimeError("the run failed")
    assert calls == ["expandable_segments:True", "expandable_segments:" + ("True" if before else "False")]
    calls.clear()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    with runner.allocator_setting(notes) as setting:
        assert setting == "max_split_size_mb:128"
    assert calls == []  # the user's configuration is left alone


def test_run_switches_the_allocator_back_when_the_pipeline_raises(pipe, image, monkeypatch):
    """run() on a (pretended) CUDA machine: the setting goes back although the pipeline raised."""
    from vramplan.runtime import runner

    calls = []
    monkeypatch.setattr(runner, "_set_allocator_settings", calls.append)
    monkeypatch.setattr(runner, "_get_allocator_settings", lambda: "")
    monkeypatch.setattr(runner, "_residency", lambda *a, **kw: {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(runner, "_sync", lambda device: None)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)

    def boom(*_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(uniform_pipeline_plan(pipe, 2, SIZE, SIZE, FRAMES), pipe=pipe, image=image, num_inference_steps=1,
            callback_on_step_end=boom, progress=False)
    assert calls == ["expandable_segments:True", "expandable_segments:False"]


@pytest.mark.parametrize("steps", [0, -5])
def test_a_run_with_no_steps_is_a_clear_error(pipe, image, steps):
    from vramplan.planner.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="at least one denoising step"):
        run(uniform_pipeline_plan(pipe, 2, SIZE, SIZE, FRAMES), pipe=pipe, image=image, num_inference_steps=steps)


def test_run_resets_hook_state_at_each_pipeline_call(pipe, image):
    from vramplan.runtime.hooks import Hook, register_hook

    class Stateful(Hook):
        def __init__(self):
            self.state: list[int] = []  # grows with each UNet call of one pipeline call
            self.seen: list[int] = []

        def wrap(self, module, call_next, args, kwargs):
            self.seen.append(len(self.state))
            self.state.append(1)
            return call_next(*args, **kwargs)

        def reset_state(self):
            self.state = []

    hook = Stateful()
    with register_hook(pipe.unet, hook, "rehash-like"):
        plan = uniform_pipeline_plan(pipe, 2, SIZE, SIZE, FRAMES)
        for _ in range(2):
            run(plan, pipe=pipe, image=image, num_inference_steps=2, output_type="pt", progress=False)
            assert hook.state == []  # reset after the call too
    assert hook.seen == [0, 1, 0, 1]  # each run started from a fresh state


def test_run_under_enable_model_cpu_offload(image):
    """diffusers' ``enable_model_cpu_offload`` (on the CPU here): its hooks move each component for its
    stage under the plan too, are re-installed by the pipeline as usual, and outlive the run."""
    from accelerate.hooks import CpuOffload

    offloaded = tiny_svd_pipeline()
    offloaded.enable_model_cpu_offload(device="cpu")
    expected = _original(offloaded, image)
    moved = []
    pre = CpuOffload.pre_forward
    try:
        CpuOffload.pre_forward = lambda self, m, *a, **kw: moved.append(type(m).__name__) or pre(self, m, *a, **kw)
        result = run(uniform_pipeline_plan(offloaded, 2, SIZE, SIZE, FRAMES), pipe=offloaded, image=image,
                     num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0), progress=False)
    finally:
        CpuOffload.pre_forward = pre
    torch.testing.assert_close(result.frames, expected, rtol=1e-5, atol=1e-5)
    assert moved.count("UNetSpatioTemporalConditionModel") == 2 and "AutoencoderKLTemporalDecoder" in moved
    assert isinstance(offloaded.unet._hf_hook, CpuOffload) and "_vramplan_hooks" not in offloaded.unet.__dict__
    assert torch.equal(_original(offloaded, image), expected)


def test_a_rehash_schedule_on_an_unsliced_unet_is_run(pipe, image):
    """A plan whose UNet component has no shape (not sliced) but a rehash schedule: run() attaches
    the schedule anyway (it used to skip the UNet and run without rehash, silently)."""
    from vramplan.runtime.rehash import with_rehash

    base = uniform_pipeline_plan(pipe, 1, height=SIZE, width=SIZE, num_frames=FRAMES)
    plan = with_rehash(base, pipe.unet, mode="uniform", steps=3)
    unet = plan.component("unet").model_copy(update={"shape": None, "slices": {}, "groups": []})
    plan = Plan.model_validate(
        plan.model_copy(update={"components": [unet if c.component == "unet" else c for c in plan.components]}).model_dump()
    )
    report = run(plan, pipe=pipe, image=image, num_inference_steps=3, decode_chunk_size=FRAMES, progress=False).report
    assert report.key_steps == plan.rehash.key_steps and report.reused_steps == plan.rehash.reused_steps
    assert len(report.unet_call_seconds) == 3


def test_streamed_blocks_and_host_placement_run_exactly_and_say_host_is_device(pipe, image):
    """Streaming and host placement on a CPU run: the same frames as the plan without them, the report says host == device, every weight back in place afterwards."""
    from vramplan.runtime.adapters import adapter_for
    from vramplan.runtime.streaming import streamable_blocks

    plan = uniform_pipeline_plan(pipe, 2, SIZE, SIZE, FRAMES)
    kw = dict(pipe=pipe, image=image, num_inference_steps=2, output_type="pt", progress=False)
    expected = run(plan, generator=torch.Generator().manual_seed(0), **kw).frames
    weights = {n: (p.data_ptr(), p.detach().clone()) for n, p in pipe.unet.named_parameters()}
    for comp in plan.components:
        model = getattr(pipe, comp.module_name)
        comp.streamed = list(streamable_blocks(model, comp.shape, adapter_for(model, comp.component).method))[::2]
        if comp.component == "unet":
            ops, _ = adapter_for(model).ops(model)
            comp.host = [ops[0].output]  # conv_in's output: read by the next segment
    result = run(plan, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(result.frames, expected)
    notes = " ".join(result.report.notes)
    assert "no CUDA device: host == device" in notes and "blocks streamed from host memory" in notes
    for name, p in pipe.unet.named_parameters():
        assert p.data_ptr() == weights[name][0] and torch.equal(p, weights[name][1])


def test_partial_offload_leaves_streamed_weights_on_the_host(monkeypatch):
    """A non-resident component with streamed blocks: the offload hook moves every other weight only."""
    from vramplan.runtime import runner

    moves = []
    monkeypatch.setattr(runner, "move_weights", lambda model, device, skip: moves.append((str(device), skip)))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    skip = {id(model[1].weight), id(model[1].bias)}
    hook = runner._partial_offload(model, torch.device("cuda"), skip)  # a device name: no CUDA needed
    try:
        hook.hook.pre_forward(model)
        hook.offload()
        assert moves == [("cpu", skip), ("cuda", skip), ("cpu", skip)]  # attached (off), run, offloaded
    finally:
        hook.remove()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_memory_snapshot_without_cuda_is_refused_before_loading(monkeypatch, tmp_path):
    from vramplan.planner.errors import InvalidArgumentError
    from vramplan.runtime import runner

    monkeypatch.setattr(runner, "load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    plan = Plan.load(_svd_plan_file(tmp_path))
    with pytest.raises(InvalidArgumentError, match="no CUDA device"):
        run(plan, memory_snapshot=tmp_path / "snap.pickle")


def _svd_plan_file(tmp_path):
    from vramplan import plan_for

    return plan_for(gpu="2080Ti", height=512, width=512, vram_gb=5).save(tmp_path / "svd.json")
