"""Step Rehash, planner side (no torch): the walk, the schedules (DP vs brute force), plans, bad input."""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys

import pytest
from vramplan.planner.costs import CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.pipeline import PipelinePlanner
from vramplan.planner.plan import shipped_pipeline_profile
from vramplan.planner.rehash import (
    Calibration,
    CalibrationMismatchError,
    CalibrationRequiredError,
    CutCalibration,
    RehashCutError,
    StageRehash,
    candidate_cuts,
    check_groups,
    greedy_for_count,
    greedy_keys,
    optimal_keys,
    profile_nodes,
    reuse_flops,
    reuse_names,
    schedule_error,
    uniform_keys,
    valid_cuts,
)
from vramplan.planner.schema import Plan

from vramplan import plan_for

# conv_in -> d0 -> d1 -> mid -> u0(mid, d1) -> u1(u0, d0) -> u2(u1, conv_in) -> out
NODES = [
    ("conv_in", ["sample"]), ("d0", ["conv_in"]), ("d1", ["d0"]), ("mid", ["d1"]),
    ("u0", ["mid", "d1"]), ("u1", ["u0", "d0"]), ("u2", ["u1", "conv_in"]), ("out", ["u2"]),
]


def test_walk_keeps_what_the_result_needs_given_the_cut():
    assert reuse_names(NODES, "out", "u0") == ["conv_in", "d0", "u1", "u2", "out"]
    assert reuse_names(NODES, "out", "u1") == ["conv_in", "u2", "out"]
    assert valid_cuts(NODES, "out", ["u0", "u1", "u2"]) == ["u0", "u1"]  # after u2 no input is read
    with pytest.raises(RehashCutError, match="no value"):
        reuse_names(NODES, "out", "nope")
    with pytest.raises(RehashCutError, match="is the model's result"):
        reuse_names(NODES, "out", "out")
    with pytest.raises(RehashCutError, match="does not depend"):
        reuse_names([*NODES, ("side", ["d0"])], "out", "side")


def test_group_across_cut_is_refused():
    check_groups([("g", ["u0", "u1"])], "u1")
    with pytest.raises(RehashCutError, match="runs across the rehash cut"):
        check_groups([("g", ["u0", "u1", "u2"])], "u1")


def test_uniform_is_deepcache():
    assert uniform_keys(25, keys=13) == list(range(0, 25, 2)) == uniform_keys(25, interval=2)
    assert uniform_keys(25, keys=9) == list(range(0, 25, 3))
    assert len(uniform_keys(25, keys=17)) == 17 and uniform_keys(25, keys=1) == [0]


def _similarity(n, seed):
    rng = random.Random(seed)
    feats = [1.0]
    for _ in range(n - 1):
        feats.append(feats[-1] + rng.uniform(0.0, 0.3))
    return [[math.exp(-abs(a - b)) for b in feats] for a in feats]


def test_greedy_threshold_and_count():
    sim = _similarity(12, 0)
    keys = greedy_keys(sim, 0.8)
    assert keys[0] == 0
    last = 0
    for s in range(1, 12):  # the paper's rule, checked step by step
        if sim[last][s] < 0.8:
            assert s in keys
            last = s
        else:
            assert s not in keys
    for k in (1, 3, 6):
        keys, t = greedy_for_count(sim, k)
        assert len(keys) <= k and keys == greedy_keys(sim, t)


def _error(n, gap, seed):
    rng = random.Random(seed)
    return [[(rng.uniform(0.01, 0.2) * (s - a) if 1 <= s - a <= gap else None) for s in range(n)] for a in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_optimal_dp_matches_brute_force(seed):
    n, gap = 9, 3
    error = _error(n, gap, seed)
    for max_keys in range(3, n + 1):
        best = math.inf
        for r in range(0, max_keys):
            for rest in itertools.combinations(range(1, n), r):
                e = schedule_error(error, [0, *rest])
                if e is not None:
                    best = min(best, e)
        keys, cost = optimal_keys(error, max_keys)
        assert len(keys) <= max_keys and keys[0] == 0
        assert cost == pytest.approx(best) and schedule_error(error, keys) == pytest.approx(best)


def test_optimal_refuses_uncalibrated_gaps():
    with pytest.raises(Exception, match="calibrated gap"):
        optimal_keys(_error(10, 2, 0), 2)


@pytest.fixture(scope="module")
def svd():
    return shipped_pipeline_profile("svd", 576, 1024, 14, True, "fp16", "flash")


def _unet(profile):
    return next(s.profile for s in profile.stages if s.profile is not None and s.per_step)


def _calibration(profile, steps=25, **overrides):
    unet = _unet(profile)
    cuts = valid_cuts(profile_nodes(unet.units), unet.result, candidate_cuts(unet.units))
    depth = {c: i for i, c in enumerate(cuts)}
    entries = []
    for c in cuts:
        sim = _similarity(steps, depth[c])
        err = [[(0.01 * (1 + depth[c]) * (s - a) if 1 <= s - a <= 4 else None) for s in range(steps)]
               for a in range(steps)]
        entries.append(CutCalibration(cut=c, similarity=sim, error=err))
    fields = dict(model=unet.model, shape=unet.shape, pipeline=profile.pipeline, scheduler="EulerDiscreteScheduler",
                  steps=steps, max_gap=4, cuts=entries)
    return Calibration(**{**fields, **overrides})


def test_candidate_cuts_of_shipped_profiles(svd):
    unet = _unet(svd)
    cuts = candidate_cuts(unet.units)
    assert cuts and all(c.startswith("up_blocks.") for c in cuts)
    assert "up_blocks.3.attentions.2.proj_out" in cuts
    assert "up_blocks.3.attentions.2.proj_out" not in valid_cuts(profile_nodes(unet.units), unet.result, cuts)


def test_uniform_plan_is_faster_and_counts_flops(svd):
    base = plan_for(gpu="4090", model="svd")
    plan = plan_for(gpu="4090", model="svd", rehash="uniform", keys=13)
    r = plan.rehash
    assert r is not None and len(r.key_steps) == 13 and r.quality == "uncalibrated" and r.calibration is None
    assert r.schedule == "uniform, every 2nd step (DeepCache's schedule)"
    assert plan.prediction.latency_s < base.prediction.latency_s
    unet = _unet(svd)
    model = CostModel(unet, find_gpu("4090"))
    full = sum(u.flops for u in unet.units)
    assert r.original_unet_flops == 25 * full
    assert r.unet_flops == 13 * full + 12 * reuse_flops(model, r.cut)
    assert r.cache_bytes == unet.units[model.index[r.cut]].output_bytes
    assert Plan.from_json(plan.to_json()) == plan
    for g in plan.component("unet").groups:  # no group runs across the cut
        assert r.cut not in g.units or g.units[-1] == r.cut


def test_latency_target_below_the_original(svd):
    base = plan_for(gpu="4090", model="svd")
    target = 0.75 * base.prediction.latency_s
    with pytest.raises(Exception, match="max_latency_s"):
        plan_for(gpu="4090", model="svd", max_latency_s=target)
    plan = plan_for(gpu="4090", model="svd", max_latency_s=target, rehash="uniform")
    assert plan.prediction.latency_s <= target and len(plan.rehash.key_steps) < 25


def test_cache_is_held_through_denoising(svd):
    gpu = find_gpu("4090")
    cut = "up_blocks.3.attentions.1.proj_out"
    plain = PipelinePlanner(svd, gpu, gpu.memory_usable_bytes, 25, "expandable_segments")
    rehashed = PipelinePlanner(svd, gpu, gpu.memory_usable_bytes, 25, "expandable_segments", StageRehash(cut, 13, 25))
    resident = {c.component: True for c in svd.components}
    a, b = plain.evaluate(resident, gpu.memory_usable_bytes), rehashed.evaluate(resident, gpu.memory_usable_bytes)
    cache = StageRehash(cut, 13, 25).cache_bytes(rehashed.models["denoise"])
    for x, y in zip(a, b, strict=True):
        assert y.base - x.base == (cache if x.stage.per_step else 0)


def test_calibrated_schedules(svd, tmp_path):
    cal = _calibration(svd)
    path = cal.save(tmp_path / "cal.json")
    opt = plan_for(gpu="4090", model="svd", rehash="optimal", calibration=path, keys=9)
    assert opt.rehash.quality == "calibrated" and opt.rehash.calibration.startswith("cal.json sha256:")
    assert len(opt.rehash.key_steps) <= 9
    uni = plan_for(gpu="4090", model="svd", rehash="uniform", calibration=cal, keys=9)
    assert opt.rehash.predicted_error <= uni.rehash.predicted_error + 1e-12
    greedy = plan_for(gpu="4090", model="svd", rehash="greedy", calibration=cal, keys=9)
    assert len(greedy.rehash.key_steps) <= 9 and greedy.rehash.threshold is not None


def test_bad_calibrations_refused(svd):
    with pytest.raises(CalibrationRequiredError, match="needs a calibration"):
        plan_for(gpu="4090", model="svd", rehash="greedy")
    with pytest.raises(CalibrationMismatchError, match="for 20 steps"):
        plan_for(gpu="4090", model="svd", rehash="optimal", keys=9, calibration=_calibration(svd, steps=20))
    unet = _unet(svd)
    other = unet.model.model_copy(update={"config_hash": "0" * 64})
    with pytest.raises(CalibrationMismatchError, match="Calibrate this model"):
        plan_for(gpu="4090", model="svd", rehash="optimal", keys=9, calibration=_calibration(svd, model=other))
    shape = unet.shape.model_copy(update={"frames": 7})
    with pytest.raises(CalibrationMismatchError, match="at the plan's shape"):
        plan_for(gpu="4090", model="svd", rehash="optimal", keys=9, calibration=_calibration(svd, shape=shape))
    with pytest.raises(Exception, match="rehash="):
        plan_for(gpu="4090", model="svd", rehash="sometimes")


def test_rehash_planning_needs_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from vramplan import plan_for\n"
        "p = plan_for(gpu='4090', model='animatediff', height=576, width=1024, rehash='uniform', keys=13)\n"
        "assert len(p.rehash.key_steps) == 13\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gaps_beyond_the_calibration_are_extrapolated_not_infinite(svd):
    """With 2 key steps of 25 every reuse gap exceeds the calibrated 4: the predictor extrapolates (finite,
    never below the largest measured gap's error) instead of refusing or ranking them as infinite."""
    from vramplan.planner.rehash_quality import QualityModel

    cal = _calibration(svd)
    plan = plan_for(gpu="4090", model="svd", rehash="optimal", keys=2, calibration=cal)
    assert len(plan.rehash.key_steps) <= 2 and math.isfinite(plan.rehash.predicted_error)
    model = QualityModel(cal)
    errors = model.errors(cal.cuts[0].cut)
    for a in range(20):
        for s in range(a + 5, 25):
            assert math.isfinite(errors[a][s]) and errors[a][s] >= cal.cuts[0].error[a][a + 4]


def test_keys_with_a_calibration_keep_the_work_of_keys_at_the_cheapest_cut(svd):
    """The synthetic calibration makes shallow cuts the most accurate. With ``keys`` alone the planner
    must not trade the whole saving away for that: the schedule spends at most the UNet work of ``keys``
    key steps at the cheapest cut, whichever cut it picks."""
    cal = _calibration(svd)
    unet = _unet(svd)
    model = CostModel(unet, find_gpu("4090"))
    cuts = [c.cut for c in cal.cuts]
    full = sum(u.flops for u in unet.units)
    cheapest = min(reuse_flops(model, c) for c in cuts)
    for mode in ("uniform", "optimal"):
        plan = plan_for(gpu="4090", model="svd", rehash=mode, calibration=cal, keys=13)
        r = plan.rehash
        assert len(r.key_steps) <= 13
        assert r.unet_flops <= 13 * full + 12 * cheapest * 1.02  # FLOPs track the planner's seconds closely
        assert r.original_unet_flops / r.unet_flops > 1.5


def test_stage_predictions_hold_the_cache(svd):
    """The cached cut is part of what the denoising stage holds, in the stage table and the floor."""
    plain = plan_for(gpu="4090", model="svd")
    plan = plan_for(gpu="4090", model="svd", rehash="uniform", keys=13)
    held = {s.stage: s.held_bytes for s in plan.stages}
    held_plain = {s.stage: s.held_bytes for s in plain.stages}
    assert held["denoise"] - held_plain["denoise"] == plan.rehash.cache_bytes
    assert all(held[s] == held_plain[s] for s in held if s != "denoise")
    gpu = find_gpu("4090")
    choice = StageRehash(plan.rehash.cut, 13, 25)
    a = PipelinePlanner(svd, gpu, gpu.memory_usable_bytes, 25, "expandable_segments")
    b = PipelinePlanner(svd, gpu, gpu.memory_usable_bytes, 25, "expandable_segments", choice)
    floors = {r: p.floor() for r, p in (("plain", a), ("rehash", b))}
    if floors["plain"][1] == "denoise":
        assert floors["rehash"][0] - floors["plain"][0] == plan.rehash.cache_bytes
    assert floors["rehash"][0] >= floors["plain"][0]


def _probed(profile, steps=25):
    """_calibration with the scheduler and decoder probes a calibration run records (predicts PSNR)."""
    sigmas = [700.0 * 0.7**s for s in range(steps)]
    gain = [abs(b - a) / math.sqrt(a * a + 1) for a, b in zip(sigmas, [*sigmas[1:], 0.0], strict=True)]
    return _calibration(profile, steps, noise_norm=[80.0] * steps, step_gain=gain, sigmas=sigmas, latent_rms=1.0,
                        decode_gain=0.3, frame_values=14 * 3 * 576 * 1024)


def test_min_psnr_plans_the_fastest_schedule_predicted_to_reach_it(svd, capsys):
    from vramplan.planner.rehash_search import QualityFloorError

    cal = _probed(svd)
    loose = plan_for(gpu="4090", model="svd", rehash="optimal", calibration=cal, min_psnr=30.0)
    tight = plan_for(gpu="4090", model="svd", rehash="optimal", calibration=cal, min_psnr=45.0)
    for plan, floor in ((loose, 30.0), (tight, 45.0)):
        assert plan.rehash.predicted_psnr >= floor and plan.rehash.schedule
    assert loose.rehash.unet_flops <= tight.rehash.unet_flops  # a lower floor never costs more
    with pytest.raises(QualityFloorError, match=r"best reachable is \d"):
        plan_for(gpu="4090", model="svd", rehash="optimal", calibration=cal, min_psnr=900.0)
    with pytest.raises(QualityFloorError, match="predicts no PSNR"):  # a calibration made before the probes
        plan_for(gpu="4090", model="svd", rehash="optimal", calibration=_calibration(svd), min_psnr=30.0)
    from vramplan.cli import main

    assert main(["plan", "--model", "svd", "--gpu", "4090", "--min-psnr", "30", "-o", "/dev/null"]) == 2
    assert "--min-psnr needs --rehash" in capsys.readouterr().err
