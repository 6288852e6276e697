"""Wan 2.1 / 2.2 pipelines: the torch-free specs (shapes, bad input, expert steps, variants), the
planner's view of a shipped profile, and a run of a tiny WanPipeline under a plan against the stock
call. Full-size profiles are shipped (profiles/models/wan*.pipeline.json, made on meta tensors)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from vramplan.planner.errors import InvalidArgumentError, PlanMismatchError
from vramplan.planner.pipelines import (
    expert_steps,
    flow_timesteps,
    pipeline_spec,
    pipeline_variant,
)

from vramplan import plan_for
from vramplan.api import sample_shape_for


# ---------------------------------------------------------------------- torch-free facts
def test_flow_timesteps_are_the_schedulers():
    from diffusers import UniPCMultistepScheduler

    for steps, shift in ((50, 3.0), (40, 5.0), (7, 12.0)):
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=shift)
        sched.set_timesteps(steps)
        ours = flow_timesteps(steps, shift)
        assert len(ours) == len(sched.timesteps)
        for a, b in zip(ours, sched.timesteps.tolist(), strict=True):
            assert a == b
        boundary = 875.0
        high = sum(t >= boundary for t in sched.timesteps.tolist())
        assert expert_steps(steps, 0.875, shift) == (high, steps - high)


def test_calls_per_run_cfg_as_two_forwards_and_the_expert_split():
    t2v, a14b = pipeline_spec("WanPipeline"), pipeline_spec("WanPipeline:A14B")
    assert t2v.stage_calls("denoise", True, 50) == 100 and t2v.stage_calls("encode_text", False, 50) == 2
    assert t2v.stage_calls("denoise", True, 50, guidance=False) == 50
    high, low = expert_steps(50, 0.875, 3.0)
    assert a14b.stage_calls("denoise", True, 50) == 2 * high > 0
    assert a14b.stage_calls("denoise_2", True, 50) == 2 * low > 0
    assert t2v.stage_calls("decode", False, 50) == 1


def test_a_checkpoint_with_two_transformers_is_the_a14b_variant():
    two = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
           "transformer_2": ["diffusers", "WanTransformer3DModel"]}
    one = {**two, "transformer_2": [None, None]}
    assert pipeline_variant("WanPipeline", two) == "WanPipeline:A14B"
    assert pipeline_variant("WanPipeline", one) == "WanPipeline"
    assert pipeline_variant("WanImageToVideoPipeline", two) == "WanImageToVideoPipeline:A14B"
    assert pipeline_variant("StableVideoDiffusionPipeline", two) == "StableVideoDiffusionPipeline"


@pytest.mark.parametrize(("model", "height", "width", "frames", "match"), [
    ("wan2.1-t2v-14b", 720, 1280, 80, "4n\\+1"),
    ("wan2.1-t2v-14b", 720, 1280, 83, "frames=81"),
    ("wan2.1-t2v-14b", 712, 1280, 81, "multiple of 16"),
    ("wan2.2-ti2v-5b", 720, 1280, 121, "multiple of 32"),
    ("wan2.1-t2v-1.3b", 480, 833, 81, "width=833"),
])
def test_bad_sizes_and_frame_counts_are_refused_before_anything_runs(model, height, width, frames, match):
    with pytest.raises(InvalidArgumentError, match=match):
        sample_shape_for(model, height, width, frames, True, "bf16")


def test_latent_shapes():
    s = sample_shape_for("wan2.1-t2v-14b", 720, 1280, 81, True, "bf16")
    assert (s.batch, s.frames, s.latent_height, s.latent_width) == (1, 21, 90, 160)  # CFG: two batch-1 calls
    s = sample_shape_for("wan2.2-ti2v-5b", 704, 1280, 121, True, "bf16")
    assert (s.frames, s.latent_height, s.latent_width) == (31, 44, 80)  # the Wan 2.2 VAE: 16x


def test_image_to_video_without_an_image_is_refused_before_loading(tmp_path):
    from vramplan.planner.schema import ComponentPlan, ModelRef, Plan
    from vramplan.runtime import run

    comp = ComponentPlan(component="transformer", model=ModelRef(class_name="WanTransformer3DModel", config_hash="0"))
    plan = Plan(pipeline="WanImageToVideoPipeline", model_name=str(tmp_path / "nowhere"), height=480, width=832,
                frames=81, components=[comp])
    with pytest.raises(InvalidArgumentError, match="image="):
        run(plan, prompt="a cat")


# ---------------------------------------------------------------------- a tiny pipeline, run
def _tiny_pipe(two_experts: bool = False):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from tiny import TINY_WAN, tiny_umt5, tiny_wan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    kw = dict(in_channels=16, out_channels=16)
    return WanPipeline(
        tokenizer=None, text_encoder=tiny_umt5(), vae=vae, scheduler=scheduler,
        transformer=tiny_wan(seed=1, **kw), transformer_2=tiny_wan(seed=2, **kw) if two_experts else None,
        boundary_ratio=0.875 if two_experts else None,
    ), TINY_WAN


def _call(pipe, **kw):
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 512, 16, generator=g)
    negative = torch.randn(1, 512, 16, generator=g)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative, height=32, width=48, num_frames=5,
                num_inference_steps=3, guidance_scale=4.0, output_type="pt", **kw)


def _plan(pipe, k, pipeline="WanPipeline"):
    from vramplan.planner.schema import Plan
    from vramplan.runtime.apply import sample_shape, uniform_component

    latents = torch.zeros(1, 16, 2, 4, 6)  # 5 frames -> 2 latent frames; 32x48 -> 4x6 latents
    comps = [uniform_component(pipe.transformer, k, sample_shape(latents, pipe.transformer)),
             uniform_component(pipe.vae, k, sample_shape(latents, pipe.vae))]  # the decode, rows with halos
    if getattr(pipe, "transformer_2", None) is not None:
        second = uniform_component(pipe.transformer_2, k, sample_shape(latents, pipe.transformer_2))
        comps.append(second.model_copy(update={"component": "transformer_2"}))
    return Plan(pipeline=pipeline, model_name="tiny-wan", height=32, width=48, frames=5, components=comps)


@pytest.mark.parametrize("two_experts", [False, True], ids=["wan2.1", "wan2.2-a14b"])
def test_a_planned_run_equals_the_stock_pipeline(two_experts):
    from vramplan.runtime import run

    pipe, _ = _tiny_pipe(two_experts)
    with torch.no_grad():
        expected = pipe(**_call(pipe), generator=torch.Generator().manual_seed(3)).frames
    pipeline = "WanPipeline:A14B" if two_experts else "WanPipeline"
    result = run(_plan(pipe, 3, pipeline), pipe=pipe, progress=False, **_call(pipe),
                 generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(result.frames, expected, rtol=1e-5, atol=1e-5)
    stages = {s.stage: s.calls for s in result.report.stages}
    high, low = expert_steps(3, 0.875, 3.0)
    assert stages["denoise"] == (2 * high if two_experts else 6)  # two batch-1 forwards per step (CFG)
    assert stages.get("denoise_2", 0) == (2 * low if two_experts else 0)


def test_a_wan22_plan_is_refused_for_a_wan21_pipeline_and_the_reverse():
    from vramplan.runtime import run

    one, _ = _tiny_pipe(False)
    with pytest.raises(PlanMismatchError, match="two transformers"):
        run(_plan(one, 2, "WanPipeline:A14B"), pipe=one, progress=False, **_call(one))
    two, _ = _tiny_pipe(True)
    with pytest.raises(PlanMismatchError, match="one transformer"):
        run(_plan(one, 2, "WanPipeline"), pipe=two, progress=False, **_call(two))


# ---------------------------------------------------------------------- shipped profiles, planned
def test_plan_for_a_laptop_answers_from_the_shipped_profile_without_torch():
    """The 14B at 720p on an 8 GB laptop: planned from the shipped profile, without torch (the DiT blocks and
    UMT5 layers streamed, the Wan VAE decode sliced along rows)."""
    code = (
        "import sys, time\n"
        "from vramplan.planner.errors import InfeasibleError\n"
        "from vramplan import plan_for\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    p = plan_for(gpu='RTX 4060 Laptop', model='wan2.1-t2v-14b', height=720, width=1280, frames=81,\n"
        "                 dtype='bf16', steps=50, host_ram_gb=64)\n"
        "    answer = 'plan' if p.prediction.peak_bytes <= p.target.usable_bytes else 'over'\n"
        "except InfeasibleError as err:\n"
        "    answer = f'{err.stage}:{err.part}'.replace(' ', '_')\n"
        "print(time.perf_counter() - t, 'torch' in sys.modules, answer)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"
    assert out[2] == "plan"
    assert float(out[0]) < 30.0  # seconds of planning (no profiling: that alone takes minutes)


def test_expert_switch_is_a_stage_boundary_without_a_spike():
    plan = plan_for(gpu="RTX 4090", model="wan2.2-t2v-a14b", height=720, width=1280, frames=81, dtype="bf16",
                    steps=50, vram_gb=12, host_ram_gb=128)
    stages = {s.stage: s for s in plan.stages}
    assert stages["denoise"].calls + stages["denoise_2"].calls == 100
    expert = max(stages["denoise"].peak_bytes, stages["denoise_2"].peak_bytes)
    assert expert <= plan.prediction.peak_bytes <= 12 * 2**30
    # the first expert is off the GPU (or streamed) while the second runs: never both whole
    both = sum(c.weight_bytes for c in _components(plan, "transformer", "transformer_2"))
    assert stages["denoise_2"].weight_bytes < both / 2


def _components(plan, *names):
    from vramplan.planner.plan import shipped_pipeline_profile

    prof = shipped_pipeline_profile(plan.model_name, plan.height, plan.width, plan.frames, True, "bf16", "flash")
    return [c for c in prof.components if c.component in names]


def _tiny_folder(tmp_path, two_experts: bool):
    """A Wan pipeline folder with tiny configs only (as save_pretrained writes them, no weights)."""
    import json

    from tiny import TINY_WAN

    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"] if two_experts else [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
             "tokenizer": ["transformers", "T5TokenizerFast"], "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "boundary_ratio": 0.875 if two_experts else None}
    dit = {"_class_name": "WanTransformer3DModel", **TINY_WAN, "in_channels": 16, "out_channels": 16}
    configs = {
        "transformer": dit, "vae": {"_class_name": "AutoencoderKLWan", "base_dim": 3, "z_dim": 16,
                                    "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                    "temperal_downsample": [False, True, True]},
        "text_encoder": {"architectures": ["UMT5EncoderModel"], "vocab_size": 100, "d_model": 16, "d_kv": 4,
                         "d_ff": 32, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8},
    }
    if two_experts:
        configs["transformer_2"] = dit
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_a14b_folder_is_profiled_once_per_identical_expert_and_planned(tmp_path):
    """A checkpoint folder with two experts is the A14B variant; the second expert (same config, same shape)
    reuses the first one's profile; the plan has a stage per expert, each holding only its own weights."""
    from vramplan.planner.gpus import find_gpu
    from vramplan.planner.pipeline import plan_pipeline
    from vramplan.runtime.profiler import pipeline_profile

    folder = _tiny_folder(tmp_path, two_experts=True)
    prof = pipeline_profile(folder, 32, 48, 5, True, "fp32", "efficient", max_k=4)
    assert prof.pipeline == "WanPipeline:A14B"
    stages = {s.stage: s for s in prof.stages}
    assert [s.stage for s in prof.stages] == ["encode_text", "denoise", "denoise_2", "decode", "postprocess"]
    assert stages["denoise"].profile == stages["denoise_2"].profile
    assert stages["decode"].profile is not None  # the Wan VAE decode, sliced along rows
    plan = plan_pipeline(prof, find_gpu("RTX 4090"), steps=10)
    calls = {s.stage: s.calls for s in plan.stages}
    high, low = expert_steps(10, 0.875, 3.0)
    assert (calls["denoise"], calls["denoise_2"], calls["encode_text"]) == (2 * high, 2 * low, 2)


def test_a_budget_below_the_floor_names_what_sets_it():
    from vramplan.planner.errors import InfeasibleError

    kw = dict(gpu="RTX 4090", model="wan2.1-t2v-1.3b", height=480, width=832, frames=81, dtype="bf16", host_ram_gb=64)
    plan = plan_for(vram_gb=2, **kw)  # the issue's target: UMT5's 2 GiB embedding table gathered from host
    text = next(c for c in plan.components if c.component == "text_encoder")
    assert "encoder.embed_tokens" in text.streamed and plan.prediction.peak_bytes <= 2 * 2**30
    with pytest.raises(InfeasibleError) as err:  # the 1.3B's floor: two UMT5 layers (one prefetched) on the GPU
        plan_for(vram_gb=1.25, **kw)
    assert err.value.stage == "encode_text" and err.value.part == "streamed weights present"
    assert "encode_text" in str(err.value) and err.value.min_peak_bytes > 1.25 * 2**30
    with pytest.raises(InfeasibleError, match="pinned host memory") as err:  # the streamed weights need RAM
        plan_for(gpu="RTX 4090", model="wan2.1-t2v-14b", height=720, width=1280, frames=81, dtype="bf16",
                 vram_gb=6, host_ram_gb=8)
    assert err.value.part == "pinned host memory"


def test_run_without_the_weights_says_how_to_get_them(monkeypatch, tmp_path):
    from vramplan.planner.errors import VramplanError
    from vramplan.runtime import run

    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    plan = plan_for(gpu="RTX 4090", model="wan2.1-t2v-1.3b", height=480, width=832, frames=81, dtype="bf16",
                    host_ram_gb=64)
    with pytest.raises(VramplanError, match="huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers"):
        run(plan, prompt="a fox")


def test_a_wan21_plan_for_a_wan22_folder_is_refused_before_any_weight_is_read(tmp_path):
    from vramplan.runtime import run

    one, _ = _tiny_pipe(False)
    plan = _plan(one, 2, "WanPipeline").model_copy(update={"model_name": _tiny_folder(tmp_path, two_experts=True)})
    with pytest.raises(PlanMismatchError, match="two transformers"):  # the folder has configs only, no weights
        run(plan, prompt_embeds=torch.zeros(1, 512, 16), progress=False)
