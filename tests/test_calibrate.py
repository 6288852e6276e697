"""Calibration: one full trajectory; its recorded reuse error is what a rehash run actually makes."""

from __future__ import annotations

import pytest
import torch
from vramplan.planner.rehash import Calibration, SchedulerOrderError
from vramplan.planner.schema import RehashPlan
from vramplan.runtime.calibrate import calibrate, plot_calibration
from vramplan.runtime.rehash import apply_rehash
from vramplan.runtime.tiny import tiny_svd_pipeline

STEPS = 4
CALL = dict(height=32, width=32, num_frames=4, decode_chunk_size=4, num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def cal(pipe, image):
    return calibrate(pipe, image=image, max_gap=2, seed=3, **CALL)


def test_calibration_shape_and_metrics(cal, tmp_path):
    assert cal.steps == STEPS and cal.shape.batch == 2 and cal.shape.frames == 4 and cal.max_gap == 2
    for entry in cal.cuts:
        sim, err = entry.similarity, entry.error
        for a in range(STEPS):
            assert sim[a][a] == pytest.approx(1.0)
            for s in range(STEPS):
                assert sim[a][s] == sim[s][a] and -1.0 <= sim[a][s] <= 1.0 + 1e-9
                assert (err[a][s] is not None) == (1 <= s - a <= 2)
                if err[a][s] is not None:
                    assert err[a][s] > 0
    path = cal.save(tmp_path / "cal.json")
    assert Calibration.load(path) == cal
    assert plot_calibration(cal, tmp_path / "cal.png").stat().st_size > 1000


def test_recorded_error_is_the_rehash_runs_error(pipe, image, cal):
    """Reusing step s-1 at step s only (every other step key): the error of the guided noise prediction
    that the pipeline itself hands its scheduler at step s (SVD: per-frame guidance scales) is the
    calibrated error[s-1][s]."""
    s = 2
    entry = cal.cuts[0]

    def guided(schedule):
        seen = []
        handle = apply_rehash(pipe, schedule) if schedule is not None else None
        step = pipe.scheduler.step

        def record(model_output, *args, **kwargs):
            seen.append(model_output.clone())
            return step(model_output, *args, **kwargs)

        pipe.scheduler.step = record
        try:
            with torch.no_grad():
                pipe(image=image, generator=torch.Generator().manual_seed(3), **CALL)
        finally:
            del pipe.scheduler.step
            if handle is not None:
                handle.remove()
        return seen

    full = guided(None)
    plan = RehashPlan(mode="uniform", cut=entry.cut, steps=STEPS, key_steps=[k for k in range(STEPS) if k != s],
                      quality="calibrated", original_unet_flops=1, unet_flops=1, key_call_s=0, reuse_call_s=0,
                      latency_saved_s=0, cache_bytes=0)
    rehashed = guided(plan)
    assert pipe.guidance_scale.flatten().unique().numel() > 1  # per-frame scales, not one
    for k in range(s):
        torch.testing.assert_close(rehashed[k], full[k], rtol=1e-5, atol=1e-5)
    g, g2 = full[s], rehashed[s]
    assert float((g2 - g).norm() / g.norm()) == pytest.approx(entry.error[s - 1][s], rel=1e-3)


def test_second_order_scheduler_refused(image):
    from diffusers import HeunDiscreteScheduler

    pipe = tiny_svd_pipeline()
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(SchedulerOrderError, match="first-order scheduler"):
        calibrate(pipe, image=image, **CALL)


def test_large_features_are_sketched_for_similarity():
    from vramplan.runtime.calibrate import SKETCH, _cosine, _sketch

    x = torch.randn(3 * SKETCH + 5)
    s = _sketch(x)
    assert s.numel() == SKETCH and torch.equal(s[:3], x[0:9:3])
    assert _cosine(_sketch(x), _sketch(2 * x)) == pytest.approx(1.0)


def test_unknown_cut_refused(pipe, image):
    from vramplan.planner.rehash import RehashCutError

    with pytest.raises(RehashCutError, match="not rehash cuts"):
        calibrate(pipe, image=image, cuts=["conv_in"], **CALL)


def test_probe_measures_the_schedulers_coefficient(pipe, image, cal):
    """SVD's Euler step with v-prediction moves the latent by dt / sqrt(sigma^2 + 1) per unit of the noise
    prediction: the probe's measurement on a copy of the scheduler must say so; the probes are gone after."""
    assert len(cal.sigmas) == len(cal.step_gain) == len(cal.noise_norm) == STEPS
    after = [*cal.sigmas[1:], 0.0]
    for s, (sigma, nxt) in enumerate(zip(cal.sigmas, after, strict=True)):
        assert cal.step_gain[s] == pytest.approx(abs(nxt - sigma) / (sigma**2 + 1) ** 0.5, rel=1e-3)
    assert cal.decode_gain > 0 and cal.frame_values == 4 * 3 * 32 * 32 and cal.latent_rms > 0
    assert "step" not in pipe.scheduler.__dict__ and "decode" not in pipe.vae.__dict__
