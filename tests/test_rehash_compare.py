"""run(plan) with a rehash schedule, compare(), and the bad inputs of a rehash run."""

from __future__ import annotations

import pytest
from vramplan.planner.rehash import CalibrationRequiredError, RehashStepsError, SchedulerOrderError
from vramplan.runtime import uniform_pipeline_plan
from vramplan.runtime.compare import compare
from vramplan.runtime.rehash import rehash_cuts, split_groups_at, with_rehash
from vramplan.runtime.runner import run
from vramplan.runtime.tiny import tiny_svd_pipeline

CALL = dict(height=32, width=32, num_frames=4)


@pytest.fixture(scope="module")
def plan(pipe):
    base = uniform_pipeline_plan(pipe, 2, **{"height": 32, "width": 32, "num_frames": 4})
    unet = split_groups_at(base.component("unet"), rehash_cuts(pipe.unet))
    base = base.model_copy(update={"components": [unet if c.component == "unet" else c for c in base.components]})
    return with_rehash(base, pipe.unet, mode="uniform", steps=5)


def test_plan_is_sliced_and_scheduled(plan):
    r = plan.rehash
    assert r.key_steps == [0, 2, 4] and r.reused_steps == [1, 3] and r.quality == "uncalibrated"
    assert r.unet_flops < r.original_unet_flops and r.cache_bytes > 0
    assert plan.component("unet").slices  # composes with slicing


def test_compare_reports_quality_flops_and_steps(pipe, image, plan):
    result = compare(plan, pipe, image=image, num_inference_steps=5)
    assert result.report.key_steps == [0, 2, 4] and result.report.reused_steps == [1, 3]
    assert len(result.report.unet_call_seconds) == 5
    assert len(result.psnr) == 4 and all(0 < s <= 1 for s in result.ssim)
    # measured in the pipeline: 3 full + 2 reuse calls, as the plan counted them on example inputs
    assert result.planned_unet_flops == pytest.approx(plan.rehash.unet_flops, rel=1e-3)
    assert result.original_unet_flops == pytest.approx(plan.rehash.original_unet_flops, rel=1e-3)
    assert result.flops_ratio > 1.2
    assert 20 < min(result.psnr) < 80  # an approximation: close, not exact
    assert "reused [1, 3]" in result.summary()


def test_steps_that_disagree_with_the_plan(pipe, image, plan):
    with pytest.raises(RehashStepsError, match="rehash schedule is for 5"):
        run(plan, pipe=pipe, image=image, num_inference_steps=4, progress=False)


def test_second_order_scheduler_run_refused(image, plan):
    from diffusers import HeunDiscreteScheduler

    heun = tiny_svd_pipeline()
    heun.scheduler = HeunDiscreteScheduler.from_config(heun.scheduler.config)
    with pytest.raises(SchedulerOrderError, match="HeunDiscreteScheduler calls the UNet 2 times"):
        run(plan, pipe=heun, image=image, num_inference_steps=5, progress=False)


def test_searched_schedules_need_a_calibration(pipe):
    base = uniform_pipeline_plan(pipe, 1, **CALL)
    with pytest.raises(CalibrationRequiredError):
        with_rehash(base, pipe.unet, mode="optimal", steps=5, keys=3)


def test_flops_budget_sets_the_key_steps(pipe):
    base = uniform_pipeline_plan(pipe, 1, **CALL)
    free = with_rehash(base, pipe.unet, mode="uniform", steps=6).rehash
    budget = (free.original_unet_flops + free.unet_flops) // 2
    r = with_rehash(base, pipe.unet, mode="uniform", steps=6, max_unet_flops=budget).rehash
    assert r.unet_flops <= budget < r.original_unet_flops and 1 < len(r.key_steps) < 6
