"""Step Rehash's quality predictor and joint search: torch-free properties, then the predictor against
rehash runs of the shipped trained model (rank correlation and PSNR, measured in the test)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from vramplan.planner.rehash import (
    Calibration,
    CalibrationRequiredError,
    CutCalibration,
    rank_cuts,
    uniform_keys,
)
from vramplan.planner.rehash_quality import QualityModel, spearman
from vramplan.planner.rehash_search import (
    QualityFloorError,
    candidates,
    frontier,
    optimal_by_count,
    ranked,
    schedule_name,
)
from vramplan.planner.schema import ModelRef, SampleShape

N = 12
CUTS = {"shallow": 0.9, "mid": 0.6, "deep": 0.2}  # reuse call cost (full call = 1)


def _cal(steps: int = N, gap: int = 3, measured: bool = True, seed: int = 0) -> Calibration:
    """A calibration whose features drift faster late (as the trained model's do) and deeper cuts err more."""
    rng = random.Random(seed)
    entries = []
    for depth, cut in enumerate(CUTS):
        pos = [0.0]
        for s in range(1, steps):
            pos.append(pos[-1] + (0.02 + 0.2 * s / steps) * rng.uniform(0.5, 1.5))
        sim = [[math.exp(-abs(pos[a] - pos[b])) for b in range(steps)] for a in range(steps)]
        err = [[(0.05 * (1 + depth) * (1 - sim[a][s]) ** 0.5 if 1 <= s - a <= gap else None) for s in range(steps)]
               for a in range(steps)]
        entries.append(CutCalibration(cut=cut, similarity=sim, error=err))
    extra = {}
    if measured:
        sigmas = [80.0 * 0.6**s for s in range(steps)]
        extra = dict(noise_norm=[10.0] * steps, sigmas=sigmas, latent_rms=1.0, decode_gain=0.3, frame_values=4096,
                     step_gain=[abs(b - a) / math.sqrt(a * a + 1) for a, b in zip(sigmas, [*sigmas[1:], 0.0], strict=True)])
    return Calibration(model=ModelRef(class_name="UNet", config_hash="0" * 64),
                       shape=SampleShape(batch=2, frames=4, latent_height=4, latent_width=4, dtype="fp32"),
                       pipeline="P", scheduler="EulerDiscreteScheduler", steps=steps, max_gap=gap, cuts=entries, **extra)


def test_every_schedule_gets_a_finite_prediction_and_reuse_lowers_it():
    cal = _cal()
    model = QualityModel(cal)
    for cut in CUTS:
        assert model.psnr(cut, list(range(N))) == math.inf  # every step key: exact
        for n in range(1, N):
            for keys in (uniform_keys(N, keys=n), sorted({0, *random.Random(n).sample(range(1, N), n - 1)})):
                p = model.psnr(cut, keys)
                assert math.isfinite(p)
                # dropping a key step (more reuse) never predicts a better video
                for k in keys[1:]:
                    assert model.psnr(cut, [x for x in keys if x != k]) <= p + 1e-9
    deep, shallow = model.psnr("deep", [0, 4, 8]), model.psnr("shallow", [0, 4, 8])
    assert deep < shallow


def test_without_scheduler_measurements_errors_are_finite_but_psnr_unknown():
    model = QualityModel(_cal(measured=False))
    assert model.psnr("mid", [0, 6]) is None and math.isfinite(model.latent_error("mid", [0]))


@pytest.mark.parametrize("seed", range(3))
def test_optimal_is_the_best_predicted_for_its_key_count(seed):
    cal = _cal(steps=9, seed=seed)
    model = QualityModel(cal)
    best = optimal_by_count(model, "mid", 9)
    for n in range(1, 10):
        brute = min(model.latent_error("mid", [0, *rest]) for rest in itertools.combinations(range(1, 9), n - 1))
        assert len(best[n]) == n and best[n][0] == 0
        assert model.latent_error("mid", best[n]) == pytest.approx(brute)


def test_names_say_deepcache_only_for_its_schedule():
    assert schedule_name("uniform", range(0, 25, 2)) == "uniform, every 2nd step (DeepCache's schedule)"
    assert "DeepCache's schedule" in schedule_name("uniform", uniform_keys(25, keys=9))  # every 3rd
    assert "not DeepCache's" in schedule_name("uniform", uniform_keys(25, keys=10))
    assert "DeepCache" not in schedule_name("greedy", [0, 3, 7], 0.97)


def test_frontier_search_floor_and_budget():
    model = QualityModel(_cal())
    cands = candidates(model, CUTS, 1.0)
    assert {c.cut for c in cands} == set(CUTS) and {c.kind for c in cands} == {"uniform", "greedy", "optimal"}
    front = frontier(cands)
    for cheaper, dearer in itertools.pairwise(front):
        assert cheaper.cost < dearer.cost and cheaper.quality < dearer.quality
    for c in cands:  # nothing beats the frontier at its cost
        assert not any(c.cost <= f.cost and c.quality > f.quality for f in front)
    budget = 0.5 * N
    best = ranked(cands, budget)[0]
    assert best.cost <= budget and all(c.quality <= best.quality for c in cands if c.cost <= budget)
    floor = sorted(c.psnr for c in cands)[len(cands) // 2]
    cheapest = ranked(cands, min_psnr=floor)[0]
    assert cheapest.psnr >= floor and all(c.cost >= cheapest.cost for c in cands if c.psnr >= floor)
    with pytest.raises(QualityFloorError, match=r"best reachable is \d+\.\d dB"):
        ranked(cands, budget=0.3 * N, min_psnr=1000.0)


def test_joint_choice_may_trade_keys_for_a_deeper_cut():
    """At the work of 6 uniform keys at the shallow cut, the deep cut affords many more keys; the planner
    compares both by predicted quality rather than fixing the cut first."""
    cal = _cal()
    options = rank_cuts(CUTS, 1.0, N, "optimal", None, 6 + 6 * 0.9, cal, None)
    model = QualityModel(cal)
    best = options[0]
    for cut in CUTS:
        assert best.psnr >= model.psnr(cut, optimal_by_count(model, cut, N)[len(best.keys)]) - 1e-9 or cut != best.cut
    assert best.psnr == max(o.psnr for o in options)


def test_min_psnr_needs_a_calibration():
    with pytest.raises(CalibrationRequiredError, match="min_psnr needs a calibration"):
        rank_cuts(CUTS, 1.0, N, "uniform", 6, None, None, None, min_psnr=30.0)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)


# ------------------------------------------------------------------------- against measured rehash runs
STEPS = 8
CUT = "up_blocks.1.attentions.1.proj_out"


def test_predictor_ranks_measured_schedules_of_the_trained_model():
    """One calibration of the trained model (8 steps, one cut) predicts the PSNR of five schedules, each then
    run against the full run: the ranks agree (Spearman >= 0.8: at most one neighbouring pair swapped) and
    each prediction is within 10 dB of the measurement (the bench: 0.9+ over 64 schedules)."""
    torch = pytest.importorskip("torch")
    from vramplan.runtime import trained
    from vramplan.runtime.calibrate import calibrate
    from vramplan.runtime.compare import rehash_video, schedule_plan

    from vramplan.cli_rehash import trained_kwargs

    torch.set_num_threads(1)
    pipe = trained.trained_svd_pipeline()
    call = dict(height=trained.HEIGHT, width=trained.WIDTH, num_frames=trained.NUM_FRAMES,
                decode_chunk_size=trained.NUM_FRAMES, num_inference_steps=STEPS, **trained_kwargs())
    image = trained.heldout_example(1)[1]
    cal = calibrate(pipe, cuts=[CUT], max_gap=2, seed=1, image=image, **call)
    assert cal.latent_rms > 0 and cal.decode_gain > 0 and len(cal.step_gain) == STEPS
    model = QualityModel(cal)
    full = rehash_video(pipe, None, seed=1, image=image, **call)
    schedules = [[0, 1, 2, 3, 4, 5, 6], [0, 2, 4, 6], optimal_by_count(model, CUT, 3)[3], [0, 1, 2], [0]]
    predicted, measured = [], []
    for keys in schedules:
        video = rehash_video(pipe, schedule_plan(CUT, keys, STEPS), seed=1, image=image, **call)
        measured.append(float(trained.psnr(video, full).mean()))
        predicted.append(model.psnr(CUT, keys))
    assert spearman(predicted, measured) >= 0.8, (predicted, measured)
    for p, m in zip(predicted, measured, strict=True):
        assert abs(p - m) <= 10.0, (predicted, measured)
