"""Half steps: under CFG reuse over a cut (``cfg+<cut>``) a reused step may run its first call whole and reuse
only the second (the key step's offset): one model call saved instead of nearly two. Runtime on a tiny
WanPipeline (exact where the schedule runs whole, the offset where it reuses, the FLOPs), the predictor and its
exact DP against brute force, the planner's prices and the integrity check on the shipped Wan 2.1 profile."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_rehash_cfg_plan import CUT as WAN_CUT
from test_rehash_cfg_plan import GPU, STEPS, _calibration, _dit, _plan
from test_rehash_residual_runtime import CUT, _call, _pipe
from vramplan.planner.rehash import RehashCutError, cfg_cut
from vramplan.planner.rehash_quality import QualityModel
from vramplan.planner.rehash_search import optimal_with_halves
from vramplan.planner.schema import PipelineProfile, RehashPlan


def _rehash(cut, keys, halves):
    return RehashPlan(mode="optimal", cut=cut, steps=4, key_steps=keys, half_steps=halves, quality="calibrated",
                      original_unet_flops=1, unet_flops=1, cache_bytes=0)


def test_a_half_step_runs_the_first_call_whole_and_reuses_the_second():
    from vramplan.runtime.rehash import apply_rehash, flop_counter

    pipe = _pipe()
    model = pipe.transformer
    calls = []
    hook = model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((args, dict(kwargs), out[0].clone())), with_kwargs=True)
    handle = apply_rehash(pipe, _rehash(cfg_cut(CUT), [0, 2], [3]))
    try:
        with torch.no_grad(), flop_counter() as counter:
            pipe(**_call(4.0))
        records = [(r.step, r.key) for r in handle.records]
    finally:
        handle.remove()
        hook.remove()
    flops = sum(counter.get_flop_counts().get(type(model).__name__, {}).values())
    assert len(calls) == 8 and records[-2:] == [(3, False), (3, False)]
    with torch.no_grad(), flop_counter() as one:
        stock = [model(*a, **k)[0] for a, k, _ in calls]
    full = sum(one.get_flop_counts().get(type(model).__name__, {}).values()) / 8
    outs = [o for _, _, o in calls]
    for i in (0, 1, 4, 5, 6):  # key steps' calls, and the half step's first call: the stock forward on their inputs
        torch.testing.assert_close(outs[i], stock[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[7], outs[6] + (outs[5] - outs[4]), rtol=1e-6, atol=1e-6)  # step 2's offset
    assert not torch.allclose(outs[7], stock[7], atol=1e-6)
    assert not torch.allclose(outs[2], stock[2], atol=1e-6)  # step 1 reused the residual
    # 5 whole calls, one reuse call under the cut, two calls without model work
    assert 5 * full < flops < 6 * full


def test_half_steps_need_cfg_reuse_over_a_cut():
    from vramplan.runtime.rehash import apply_rehash

    for cut in (CUT, "cfg"):
        with pytest.raises(RehashCutError, match="half steps"):
            apply_rehash(_pipe(), _rehash(cut, [0, 2], [3]))
    with pytest.raises(ValueError, match="half_steps"):
        _rehash(cfg_cut(CUT), [0, 2], [2])  # a key step cannot be a half step


# ---------------------------------------------------------------------- the predictor and the search
@pytest.fixture(scope="module")
def wan():
    from test_rehash_cfg_plan import WAN

    return PipelineProfile.load(WAN)


def test_the_dp_finds_the_best_keys_and_halves(wan):
    cal = _calibration(wan, {"cfg": 0.02, cfg_cut(WAN_CUT): 0.05})
    model = QualityModel(cal)
    cut = cfg_cut(WAN_CUT)
    found = optimal_with_halves(model, cut, 5, 2)
    for (n, h), (keys, halves) in found.items():
        assert keys[0] == 0 and len(keys) == n and len(halves) == h and not set(keys) & set(halves)
        brute = min(model.latent_error(cut, (0, *k), hv)
                    for k in itertools.combinations(range(1, STEPS), n - 1)
                    for hv in itertools.combinations([s for s in range(1, STEPS) if s not in k], h))
        assert model.latent_error(cut, keys, halves) == pytest.approx(brute)
    # a half step's error is CFG reuse alone's, from the same key
    e, half = model.errors(cut), model.errors("cfg")
    assert model.latent_error(cut, [0], [1]) - model.latent_error(cut, [0]) == pytest.approx(
        model.weight[1] * (half[0][1] - e[0][1]))


def test_the_planner_chooses_half_steps_and_prices_them(wan):
    from vramplan.planner.costs import CostModel
    from vramplan.planner.gpus import find_gpu
    from vramplan.planner.integrity import problems
    from vramplan.planner.rehash import reuse_flops

    # CFG reuse alone is nearly free of error, the residual on top of it is not: half steps pay off
    plan = _plan(wan, _calibration(wan, {"cfg": 1e-5, WAN_CUT: 0.5, cfg_cut(WAN_CUT): 0.3}), keys=5)
    r = plan.rehash
    assert r.cut == cfg_cut(WAN_CUT) and r.half_steps, r
    dit = _dit(wan)
    model = CostModel(dit, find_gpu(GPU))
    full = sum(u.flops for u in dit.units)
    n, h = len(r.key_steps), len(r.half_steps)
    assert r.unet_flops == n * full + h * (full // 2) + (STEPS - n - h) * reuse_flops(model, r.cut)
    assert r.latency_saved_s == pytest.approx(
        2 * ((STEPS - n - h) * (r.key_call_s - r.reuse_call_s) + h * r.key_call_s / 2), rel=1e-3)
    assert "reuse the second only" in r.schedule or "reuses the second only" in r.schedule
    assert problems(plan, wan) == []
    stage = next(s for s in plan.stages if s.stage == "denoise")
    assert stage.seconds == pytest.approx(
        2 * (n * r.key_call_s + h * r.key_call_s / 2 + (STEPS - n - h) * r.reuse_call_s), rel=1e-3)
    # a plan file whose half steps are not under CFG reuse over a cut is refused, naming the field
    edited = plan.model_copy(update={"rehash": r.model_copy(update={"cut": WAN_CUT})})
    assert any("rehash.half_steps" in p for p in problems(edited, wan))
    assert math.isfinite(r.predicted_psnr)


def test_with_rehash_plans_half_steps_and_counts_their_flops():
    """The runtime's planner (FLOPs counted by PyTorch on the model), on a calibration where CFG reuse alone is
    nearly exact one step after a key and far off later, and the cut on top of it is fair: within 2.5 calls' and
    a reuse call's FLOPs of 4 steps, 2 keys, a half step and a reuse step (CFG reuse alone cannot: 1 key)."""
    from vramplan.runtime.calibrate import calibrate
    from vramplan.runtime.rehash import measure_cuts, with_rehash

    pipe = _pipe()
    kwargs = {k: v for k, v in _call(4.0).items() if k not in ("generator", "output_type")}
    cal = calibrate(pipe, cuts=["cfg", cfg_cut(CUT)], max_gap=3, seed=3, **kwargs)
    for entry in cal.cuts:
        entry.error = [[None if e is None else (1.0 if entry.cut != "cfg" else 1e-6 if s - a == 1 else 10.0)
                        for s, e in enumerate(row)] for a, row in enumerate(entry.error)]
    full, reuse, _ = measure_cuts(pipe.transformer, cal.shape, ["cfg", cfg_cut(CUT)])
    plan = _bare_plan(pipe)
    planned = with_rehash(plan, pipe.transformer, mode="optimal", steps=4, calibration=cal,
                          max_unet_flops=2 * full + reuse["cfg"] + reuse[cfg_cut(CUT)])
    r = planned.rehash
    assert r.cut == cfg_cut(CUT) and len(r.key_steps) == 2 and len(r.half_steps) == 1, r
    assert r.unet_flops == 2 * full + full // 2 + reuse[cfg_cut(CUT)]
    assert "reuses the second only" in r.schedule


def _bare_plan(pipe):
    from vramplan.planner.schema import Plan
    from vramplan.runtime.apply import sample_shape, uniform_component

    comp = uniform_component(pipe.transformer, 1, sample_shape(torch.zeros(1, 16, 2, 4, 6), pipe.transformer))
    return Plan(pipeline="WanPipeline", model_name="tiny-wan", height=32, width=48, frames=5, components=[comp])
