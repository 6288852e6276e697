"""Step Rehash on Wan 2.2's two experts: ``transformer`` runs the high-noise steps, ``transformer_2`` the rest.
Each expert runs its part of the schedule with its own caches (its first step a key step), and the planner
prices each per-step stage for the steps it runs. Tiny WanPipeline with two experts (boundary 0.875, as
diffusers' Wan 2.2 tests build it); the planner on the shipped Wan 2.2 T2V-A14B profile."""

from __future__ import annotations

import pytest
import torch
from vramplan.planner.rehash import RehashStepsError, cfg_cut, residual_cut
from vramplan.planner.schema import RehashPlan

STEPS = 6  # flow shift 3: timesteps 999, 937 >= 875 (transformer), then 857 .. (transformer_2 from step 2)
CUT = residual_cut("blocks.0.ffn", "blocks.1.ffn")


def _pipe():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from tiny import tiny_umt5, tiny_wan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0, solver_order=1)
    kw = dict(in_channels=16, out_channels=16, num_layers=3)
    return WanPipeline(tokenizer=None, text_encoder=tiny_umt5(), vae=vae, scheduler=scheduler,
                       transformer=tiny_wan(seed=1, **kw), transformer_2=tiny_wan(seed=2, **kw), boundary_ratio=0.875)


def _call():
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 512, 16, generator=g), negative_prompt_embeds=torch.randn(1, 512, 16, generator=g),
                height=32, width=48, num_frames=5, num_inference_steps=STEPS, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(3))


def _rehash(cut, keys, halves=()):
    return RehashPlan(mode="uniform", cut=cut, steps=STEPS, key_steps=keys, half_steps=list(halves),
                      quality="uncalibrated", original_unet_flops=1, unet_flops=1, cache_bytes=1)


def _recorded(model):
    calls = []
    hook = model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((args, dict(kwargs), out[0].clone())), with_kwargs=True)
    return calls, hook


@pytest.mark.parametrize("cut", [CUT, cfg_cut(CUT)])
def test_each_expert_runs_its_part_of_the_schedule(cut):
    from vramplan.runtime.rehash import apply_rehash, expert_first_step

    pipe = _pipe()
    one, two = _recorded(pipe.transformer), _recorded(pipe.transformer_2)
    handle = apply_rehash(pipe, _rehash(cut, [0, 2, 4]))
    try:
        with torch.no_grad():
            pipe(**_call())
        assert expert_first_step(pipe, pipe.scheduler) == 2
        expert = handle.experts["transformer_2"]
        mine = [(r.step, r.key) for r in handle.records]
        theirs = [(r.step, r.key) for r in expert.records]
    finally:
        handle.remove()
        one[1].remove()
        two[1].remove()
    assert sorted({s for s, _ in mine}) == [0, 1] and sorted({s for s, _ in theirs}) == [2, 3, 4, 5]
    assert {s for s, k in theirs if k} == {2, 4} and {s for s, k in mine if k} == {0}  # its first step: key
    assert handle.key_steps == [0, 2, 4] and handle.reused_steps == [1, 3, 5]
    # a key call is the stock forward's output on its inputs; a reuse call is not (it reused a residual, or
    # under CFG reuse the offset)
    with torch.no_grad():
        for model, (recorded, _), steps in ((pipe.transformer, one, range(0, 2)), (pipe.transformer_2, two, range(2, 6))):
            made = [s for s in steps for _ in range(2)]  # CFG: two calls per step
            assert len(recorded) == len(made)
            for (args, kwargs, out), step in zip(recorded, made, strict=True):
                stock = model(*args, **kwargs)[0]
                if step in (0, 2, 4):
                    torch.testing.assert_close(out, stock, rtol=1e-5, atol=1e-5)
                else:
                    assert not torch.allclose(out, stock, rtol=1e-5, atol=1e-5)
    assert pipe.scheduler.__dict__.get("step") is None and pipe.scheduler.__dict__.get("set_timesteps") is None


def test_a_schedule_that_reuses_across_the_experts_is_refused():
    from vramplan.runtime.hooks import PLAN_HOOK, get_hook
    from vramplan.runtime.rehash import apply_rehash

    pipe = _pipe()
    handle = apply_rehash(pipe, _rehash(CUT, [0, 3]))  # step 2 (transformer_2's first) would reuse
    try:
        with torch.no_grad(), pytest.raises(RehashStepsError, match="second expert.*step 2"):
            pipe(**_call())
    finally:
        handle.remove()
    assert get_hook(pipe.transformer_2, PLAN_HOOK) is None and get_hook(pipe.transformer, PLAN_HOOK) is None


# ---------------------------------------------------------------------- the planner (torch-free)
A14B = "profiles/models/wan2.2-t2v-a14b-720x1280-f81-cfg-bf16-flash.pipeline.json"


@pytest.fixture(scope="module")
def a14b():
    from vramplan.planner.gpus import find_gpu
    from vramplan.planner.rehash import plan_rehash
    from vramplan.planner.schema import PipelineProfile

    profile = PipelineProfile.load(A14B)
    return profile, plan_rehash(profile, find_gpu("h100"), mode="uniform", keys=8, steps=20)


def test_each_expert_is_priced_for_its_own_steps(a14b):
    from vramplan.planner.plan import component_seconds, segments_of
    from vramplan.planner.rehash import CutCostModel, expert_firsts, expert_parts, reuse_seconds

    profile, plan = a14b
    parts = expert_parts(profile, 20)
    assert [(n, (r.start, r.stop), c) for n, r, _, c in parts] == [("denoise", (0, 7), 2), ("denoise_2", (7, 20), 2)]
    assert expert_firsts(profile, 20) == [7] and 7 in plan.rehash.key_steps and len(plan.rehash.key_steps) <= 8
    gpu = plan.target.gpu
    from vramplan.planner.gpus import find_gpu

    total = 0.0
    for name, own, stage, calls in parts:
        model = CutCostModel(stage.profile, find_gpu(gpu), plan.target.allocator, plan.rehash.cut)
        comp = plan.component(stage.component)
        full = component_seconds(model, comp)
        reuse = reuse_seconds(model, segments_of(model, comp), plan.rehash.cut, comp.host, comp.streamed)
        keys = len(set(plan.rehash.key_steps) & set(own))
        seconds = calls * (keys * full + (len(own) - keys) * reuse)
        pred = next(s for s in plan.stages if s.stage == name)
        assert pred.seconds == pytest.approx(seconds, rel=1e-3)
        total += calls * len(own) * full
    # the whole denoising as priced: every step once (before, each expert was priced for all 20 steps)
    stages = sum(s.seconds for s in plan.stages if s.stage.startswith("denoise"))
    assert stages < total


def test_integrity_checks_the_experts_part(a14b):
    from vramplan.planner.integrity import problems

    profile, plan = a14b
    assert list(problems(plan, profile)) == []
    keys = [k for k in plan.rehash.key_steps if k != 7]
    edited = plan.model_copy(update={"rehash": plan.rehash.model_copy(update={"key_steps": keys})})
    found = list(problems(edited, profile))
    assert any("lacks step 7" in p for p in found), found


def test_run_puts_both_experts_under_the_plan_and_its_schedule():
    """``vramplan.runtime.run`` with a sliced two-expert plan: the second expert's handle slices it and runs
    its part of the schedule (before, it ran sliced but every step whole; the report's key steps say so)."""
    from vramplan.planner.schema import Plan
    from vramplan.runtime import run
    from vramplan.runtime.apply import sample_shape, uniform_component
    from vramplan.runtime.rehash import split_groups_at

    pipe = _pipe()
    latents = torch.zeros(1, 16, 2, 4, 6)
    comps = []
    for name in ("transformer", "transformer_2"):
        comp = uniform_component(getattr(pipe, name), 2, sample_shape(latents, getattr(pipe, name)))
        comps.append(split_groups_at(comp, [CUT]).model_copy(update={"component": name}))
    plan = Plan(pipeline="WanPipeline:A14B", model_name="tiny-wan", height=32, width=48, frames=5, components=comps,
                rehash=_rehash(CUT, [0, 2, 4]))
    call = {k: v for k, v in _call().items() if k != "output_type"}
    result = run(plan, pipe=pipe, progress=False, **call)
    assert result.report.key_steps == [0, 2, 4] and result.report.reused_steps == [1, 3, 5]
