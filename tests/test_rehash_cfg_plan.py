"""``plan_for``'s joint search offers per-step CFG reuse (``cfg``, ``cfg+<residual cut>``) where a calibration
measured two model calls per step, priced as the runtime counts it (per call, the mean of a reuse step's
two calls). Torch-free, on the shipped Wan 2.1 T2V-1.3B profile with hand-made calibrations."""

from __future__ import annotations

import math

import pytest
from vramplan.planner.costs import CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.integrity import problems
from vramplan.planner.plan import component_seconds, segments_of, shipped_pipeline_profile
from vramplan.planner.rehash import (
    Calibration,
    CutCalibration,
    RehashCutError,
    cfg_cut,
    cfg_split,
    cut_bytes,
    plan_rehash,
    reuse_flops,
    reuse_seconds,
)
from vramplan.planner.schema import PipelineProfile

WAN = "profiles/models/wan2.1-t2v-1.3b-480x832-f81-cfg-bf16-flash.pipeline.json"
CUT = "blocks.0.ffn->blocks.29.ffn"  # first block, then the span to the last: the cheapest residual cut
STEPS = 10
GPU = "h100"


@pytest.fixture(scope="module")
def wan():
    return PipelineProfile.load(WAN)


def _dit(profile):
    return next(s.profile for s in profile.stages if s.per_step and s.profile is not None)


def _calibration(profile, scale: dict[str, float], calls: int | None = 2) -> Calibration:
    """Reuse error ``scale[cut] * gap`` at gaps 1..4, and the probes that make it predict PSNR."""
    dit = _dit(profile)
    entries = []
    for cut, k in scale.items():
        sim = [[math.exp(-k * abs(a - b)) for b in range(STEPS)] for a in range(STEPS)]
        err = [[k * (s - a) if 1 <= s - a <= 4 else None for s in range(STEPS)] for a in range(STEPS)]
        entries.append(CutCalibration(cut=cut, similarity=sim, error=err))
    sigmas = [1.0 - s / STEPS for s in range(STEPS)]
    return Calibration(model=dit.model, shape=dit.shape, pipeline=profile.pipeline,
                       scheduler="FlowMatchEulerDiscreteScheduler", steps=STEPS, max_gap=4, calls_per_step=calls,
                       cuts=entries, noise_norm=[50.0] * STEPS, step_gain=[1.0 / STEPS] * STEPS, sigmas=sigmas,
                       flow_matching=True, latent_rms=1.0, decode_gain=0.5, frame_values=81 * 3 * 480 * 832)


def _plan(profile, cal, **kw):
    return plan_rehash(profile, find_gpu(GPU), mode="optimal", calibration=cal, steps=STEPS, **kw)


def test_cfg_reuse_is_chosen_when_it_is_the_better_one(wan):
    cuts = {"cfg": 1e-4, CUT: 0.5, cfg_cut(CUT): 0.5}
    plan = _plan(wan, _calibration(wan, cuts), keys=8)
    r = plan.rehash
    assert r.cut == "cfg" and r.quality == "calibrated" and r.predicted_psnr is not None
    # priced as the runtime counts it: a reuse step runs the first call whole, the second not at all
    dit = _dit(wan)
    model = CostModel(dit, find_gpu(GPU))
    full = sum(u.flops for u in dit.units)
    n = len(r.key_steps)
    assert 1 <= n < 8 and r.unet_flops == n * full + (STEPS - n) * (full // 2)
    assert r.reuse_call_s == pytest.approx(r.key_call_s / 2, rel=1e-4)
    assert r.cache_bytes == dit.units[model.index[dit.result]].output_bytes  # one offset
    # the key count the ``keys`` budget allows: the work of 8 key steps at the cheapest cut
    cheapest = min(reuse_flops(model, c) for c in cuts)
    assert r.unet_flops <= (8 * full + 2 * cheapest) * 1.02
    assert problems(plan, wan) == []  # the integrity check recomputes the prediction and the rehash numbers

    # the residual cut is the better one: it is chosen, CFG reuse is not
    swapped = _plan(wan, _calibration(wan, {"cfg": 0.5, CUT: 1e-4, cfg_cut(CUT): 0.5}), keys=8)
    assert swapped.rehash.cut == CUT


def test_cfg_reuse_over_a_residual_cut_is_priced_as_half_its_reuse_call(wan):
    plan = _plan(wan, _calibration(wan, {"cfg": 0.5, CUT: 0.5, cfg_cut(CUT): 1e-4}), keys=8)
    r = plan.rehash
    assert r.cut == cfg_cut(CUT)
    dit = _dit(wan)
    model = CostModel(dit, find_gpu(GPU))
    comp = plan.component("transformer")
    base = reuse_seconds(model, segments_of(model, comp), CUT, comp.host, comp.streamed)
    assert r.reuse_call_s == pytest.approx(base / 2, rel=1e-3) and r.reuse_call_s < r.key_call_s
    assert reuse_flops(model, r.cut) == reuse_flops(model, CUT) // 2
    assert r.cache_bytes == cut_bytes(model, CUT) + dit.units[model.index[dit.result]].output_bytes
    assert problems(plan, wan) == []
    # a fixed CFG cut plans without a calibration too (uniform): half the key call's time per reuse call
    fixed = plan_rehash(wan, find_gpu(GPU), mode="uniform", keys=5, steps=STEPS, cut="cfg").rehash
    assert fixed.cut == "cfg" and len(fixed.key_steps) == 5
    assert fixed.reuse_call_s == pytest.approx(fixed.key_call_s / 2, rel=1e-4)
    assert component_seconds(model, comp) > 0


def test_cfg_reuse_only_where_a_step_makes_two_calls(wan):
    # a calibration that did not measure two calls per step: its CFG entries are not searched
    plan = _plan(wan, _calibration(wan, {"cfg": 1e-4, CUT: 0.5}, calls=None), keys=8)
    assert not cfg_split(plan.rehash.cut)[0]
    # a UNet pipeline (its CFG batch in one call) is refused a fixed CFG cut, with the reason
    svd = shipped_pipeline_profile("svd", 576, 1024, 14, True, "fp16", "flash")
    with pytest.raises(RehashCutError, match="twice per step"):
        plan_rehash(svd, find_gpu("4090"), mode="uniform", keys=13, steps=25, cut="cfg")


def test_a_wan_plan_prices_both_calls_of_a_step(wan):
    """Wan's CFG calls the DiT twice per step: the denoising stage, the latency budget, the time saved and the
    held caches count both calls (every step key = the plain plan's latency)."""
    from vramplan.planner.pipeline import plan_pipeline

    gpu = find_gpu(GPU)
    plain = plan_pipeline(wan, gpu, steps=25)
    every = plan_rehash(wan, gpu, mode="uniform", keys=25, steps=25, cut=CUT)
    assert every.prediction.latency_s == pytest.approx(plain.prediction.latency_s, rel=0.01)
    plan = plan_rehash(wan, gpu, mode="uniform", keys=13, steps=25, cut=CUT)
    r = plan.rehash
    denoise = next(s for s in plan.stages if s.stage == "denoise")
    assert denoise.calls == 50 and denoise.seconds == pytest.approx(2 * (13 * r.key_call_s + 12 * r.reuse_call_s),
                                                                    rel=1e-3)
    assert r.latency_saved_s == pytest.approx(2 * 12 * (r.key_call_s - r.reuse_call_s), rel=1e-3)
    assert r.cache_bytes == 2 * cut_bytes(CostModel(_dit(wan), gpu), CUT)
    assert problems(plan, wan) == []
    target = 0.7 * plain.prediction.latency_s
    fast = plan_rehash(wan, gpu, mode="uniform", steps=25, max_latency_s=target)
    assert fast.prediction.latency_s <= target and len(fast.rehash.key_steps) < 25
