"""Calibrating a DiT's residual cuts on a tiny WanPipeline (CFG as two model calls per step): the
recorded reuse error is what a rehash run makes, and the calibration plans schedules as the UNet's does."""

from __future__ import annotations

import pytest
import torch
from test_rehash_residual_runtime import _call, _pipe, _plan
from vramplan.planner.rehash import CalibrationMismatchError, SchedulerOrderError, residual_cut
from vramplan.planner.rehash_search import QualityFloorError
from vramplan.planner.schema import RehashPlan
from vramplan.runtime.calibrate import calibrate
from vramplan.runtime.rehash import apply_rehash, with_rehash

CUTS = [residual_cut("blocks.0.ffn", "blocks.2.ffn"), residual_cut("blocks.0.ffn", "blocks.3.ffn")]


def _kwargs(guidance=4.0):
    kw = _call(guidance)
    kw.pop("generator")
    kw.pop("output_type")
    return kw


@pytest.fixture(scope="module")
def wan():
    return _pipe()


@pytest.fixture(scope="module")
def cal(wan):
    return calibrate(wan, cuts=CUTS, max_gap=2, seed=3, **_kwargs())


def test_a_dit_calibration_measures_both_calls_of_each_step(cal):
    assert cal.calls_per_step == 2 and cal.shape.batch == 1 and cal.steps == 4
    assert [c.cut for c in cal.cuts] == CUTS
    for entry in cal.cuts:
        for a in range(4):
            assert entry.similarity[a][a] == pytest.approx(1.0)
            for s in range(4):
                assert (entry.error[a][s] is not None) == (1 <= s - a <= 2)
                assert entry.error[a][s] is None or entry.error[a][s] > 0
    # the probes measured the scheduler and the Wan decoder: the predictor rates schedules in dB
    assert len(cal.step_gain) == 4 and cal.decode_gain > 0 and cal.frame_values == 5 * 3 * 32 * 48


def test_recorded_error_is_the_rehash_runs_error(wan, cal):
    """Reusing step 1's residual at step 2 (both calls, each its own cache): the error of the guided noise
    prediction Wan hands its scheduler at step 2 is the calibrated error[1][2]."""
    s, entry = 2, cal.cuts[0]

    def guided(schedule):
        seen, step = [], wan.scheduler.step
        handle = apply_rehash(wan, schedule) if schedule is not None else None
        inner = wan.scheduler.step

        def record(model_output, *args, **kwargs):
            seen.append(model_output.clone())
            return inner(model_output, *args, **kwargs)

        wan.scheduler.step = record
        try:
            with torch.no_grad():
                wan(generator=torch.Generator().manual_seed(3), output_type="latent", **_kwargs())
        finally:
            if handle is not None:
                handle.remove()
            if "step" in wan.scheduler.__dict__:
                del wan.scheduler.step
            assert wan.scheduler.step == step
        return seen

    full = guided(None)
    plan = RehashPlan(mode="uniform", cut=entry.cut, steps=4, key_steps=[0, 1, 3], quality="calibrated",
                      original_unet_flops=1, unet_flops=1, cache_bytes=0)
    rehashed = guided(plan)
    for k in range(s):
        torch.testing.assert_close(rehashed[k], full[k], rtol=1e-5, atol=1e-5)
    g, g2 = full[s], rehashed[s]
    assert float((g2 - g).norm() / g.norm()) == pytest.approx(entry.error[s - 1][s], rel=1e-3)


def test_the_calibration_plans_a_dit_schedule_and_refuses_another_shape(wan, cal):
    plan = _plan(wan, 1).model_copy(update={"rehash": None})
    r = with_rehash(plan, wan.transformer, mode="optimal", steps=4, keys=2, calibration=cal).rehash
    assert r.quality == "calibrated" and r.cut in CUTS and len(r.key_steps) <= 2
    assert r.predicted_psnr is not None and r.unet_flops < r.original_unet_flops
    assert r.cache_bytes == 2 * 12 * 24 * 4  # a residual (12 tokens x 24 channels, fp32) per CFG call
    other = cal.model_copy(update={"shape": cal.shape.model_copy(update={"latent_height": 8})})
    with pytest.raises(CalibrationMismatchError, match="Calibrate at the plan's shape"):
        with_rehash(plan, wan.transformer, mode="optimal", steps=4, keys=2, calibration=other)
    with pytest.raises(CalibrationMismatchError, match="made for 4 steps"):
        with_rehash(plan, wan.transformer, mode="optimal", steps=5, keys=2, calibration=cal)
    with pytest.raises(QualityFloorError, match=r"the best reachable is [0-9.]+ dB"):
        with_rehash(plan, wan.transformer, mode="optimal", steps=4, calibration=cal, min_psnr=400)
    fewest = with_rehash(plan, wan.transformer, mode="optimal", steps=4, calibration=cal, min_psnr=1).rehash
    assert fewest.predicted_psnr >= 1 and fewest.unet_flops <= r.unet_flops


def test_a_second_order_scheduler_is_refused_for_a_dit():
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = _pipe()
    pipe.scheduler = FlowMatchHeunDiscreteScheduler()
    with pytest.raises(SchedulerOrderError, match="first-order scheduler"):
        calibrate(pipe, cuts=CUTS[:1], **_kwargs())


def test_flow_matching_noise_levels_carry_errors_as_a_scaled_latent(cal):
    """x = (1 - s) x0 + s noise: an error after a step at noise level s reaches the end scaled by
    sd / sqrt(s^2 + sd^2 (1 - s)^2) (sd: the data's RMS), the last step's by 1."""
    from vramplan.planner.rehash_quality import QualityModel

    flow = cal.model_copy(update={"sigmas": [1.0, 0.75, 0.5, 0.25], "latent_rms": 0.5, "flow_matching": True})
    after = [0.75, 0.5, 0.25, 0.0]
    assert QualityModel.carry(flow) == pytest.approx([0.5 / (s * s + 0.25 * (1 - s) ** 2) ** 0.5 for s in after])
    plain = flow.model_copy(update={"flow_matching": False})
    assert QualityModel.carry(plain) == pytest.approx([0.5 / (s * s + 0.25) ** 0.5 for s in after])
    assert cal.flow_matching is True and len(cal.sigmas) == 4  # the tiny Wan's UniPC with flow sigmas
