"""Measured, then predicted: ``calibrate --refine`` runs the best-predicted schedules at each FLOPs level on
the calibration's own call and stores their measured PSNR; the planner ranks a measured schedule by the
measurement. Tiny WanPipeline (CFG as two calls per step, 4 steps), two residual cuts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_rehash_dit_calibrate import CUTS, _kwargs
from test_rehash_residual_runtime import _pipe, _plan
from vramplan.planner.errors import PlanFormatError, UnsupportedArgumentError
from vramplan.planner.rehash import Calibration, CalibrationMismatchError, MeasuredSchedule, rehash_summary
from vramplan.planner.rehash_search import frontier, ranked, refinement
from vramplan.runtime.calibrate import calibrate, frontier_rows, refine, schedule_candidates
from vramplan.runtime.compare import rehash_video, schedule_plan
from vramplan.runtime.rehash import with_rehash


@pytest.fixture(scope="module")
def wan():
    return _pipe()


@pytest.fixture(scope="module")
def cal(wan):
    return calibrate(wan, cuts=CUTS, max_gap=2, seed=3, **_kwargs())


@pytest.fixture(scope="module")
def refined(wan, cal):
    return refine(wan, cal, 1, **_kwargs())


def test_refine_measures_the_top_schedule_of_every_frontier_level(wan, cal, refined):
    cands, _ = schedule_candidates(wan.transformer, cal)
    wanted = {(c.cut, c.keys, c.halves) for c in refinement(cands, 1)}
    assert {m.key for m in refined.measured} == wanted and len(wanted) >= 2
    assert {(c.cut, c.keys, c.halves) for c in frontier(cands)} <= wanted  # each level's best is its frontier point
    assert cal.measured == []  # the calibration given is not changed
    # each stored PSNR is what running that schedule on the calibration's call (same seed) measures
    m = refined.measured[0]
    kw = {**_kwargs(), "num_inference_steps": refined.steps}
    full = rehash_video(wan, None, seed=3, **kw)
    video = rehash_video(wan, schedule_plan(m.cut, m.key_steps, refined.steps), seed=3, **kw)
    mse = float((video.double() - full.double()).square().mean())
    assert m.psnr == pytest.approx(min(200.0, 10 * math.log10(4 / mse)), abs=1e-3)
    assert m.predicted_psnr is not None
    assert refine(wan, refined, 1, **_kwargs()).measured == refined.measured  # nothing left to measure: no rerun


def test_the_planner_ranks_a_measured_schedule_by_its_measurement(wan, cal, refined, tmp_path):
    cands, full = schedule_candidates(wan.transformer, refined)
    measured = [c for c in cands if c.measured]
    assert measured and all(c.source == "measured" and c.predicted is not None for c in measured)
    for c in measured:
        m = next(m for m in refined.measured if m.key == (c.cut, c.keys, c.halves))
        assert c.psnr == m.psnr and c.predicted == pytest.approx(m.predicted_psnr, abs=1e-3)
    rows = frontier_rows(cands, full, refined.steps)
    assert {r["psnr_source"] for r in rows} <= {"measured", "predicted"} and any(
        r["psnr_source"] == "measured" for r in rows)
    # a schedule the predictor rates worst at the cheapest level, measured (by hand here) far above the others:
    # the planner takes it; the plan says the PSNR was measured and keeps the prediction
    budget = max(c.cost for c in cands if len(c.keys) == 1)
    within = ranked(schedule_candidates(wan.transformer, cal)[0], budget)  # predictions alone
    low = within[-1]
    assert len(within) >= 2 and within[0].psnr > low.psnr
    boost = Calibration.model_validate({**cal.model_dump(), "measured": [
        MeasuredSchedule(cut=c.cut, key_steps=list(c.keys), half_steps=list(c.halves),
                         psnr=199.0 if c is low else c.psnr - 1).model_dump() for c in within]})
    best = ranked(schedule_candidates(wan.transformer, boost)[0], budget)[0]
    assert (best.cut, best.keys, best.measured) == (low.cut, low.keys, True)
    plan = _plan(wan, 1).model_copy(update={"rehash": None})
    path = boost.save(tmp_path / "cal.json")
    r = with_rehash(plan, wan.transformer, mode="optimal", steps=4, calibration=str(path),
                   max_unet_flops=budget).rehash
    assert (r.cut, tuple(r.key_steps)) == (low.cut, low.keys) and r.measured_psnr == 199.0
    assert r.predicted_psnr == pytest.approx(low.psnr, abs=1e-2)
    assert "measured 199.0 dB" in rehash_summary(plan.model_copy(update={"rehash": r}))
    other = _pipe()
    other.transformer.register_to_config(num_layers=5)  # another model: the refinement refuses its calibration
    with pytest.raises(CalibrationMismatchError, match="Calibrate this model"):
        refine(other, refined, 1, **_kwargs())


def test_unmeasured_predictions_move_by_the_nearest_measured_error():
    """A predictor running 10 dB high at few key steps would otherwise outrank the measured schedule there with
    an unmeasured neighbour; each unmeasured schedule moves by the measured-minus-predicted nearest in cost."""
    from vramplan.planner.rehash_search import Candidate, corrected

    def cand(cost, psnr, measured=None):
        c = Candidate("c", (0,), "optimal", cost, 1.0, psnr)
        return c if measured is None else Candidate("c", (0,), "optimal", cost, 1.0, measured, predicted=psnr,
                                                     measured=True)

    cands = [cand(10.0, 40.0, measured=30.0), cand(11.0, 39.0), cand(100.0, 60.0, measured=65.0), cand(90.0, 58.0)]
    out = corrected(cands)
    assert [c.psnr for c in out] == [30.0, 29.0, 65.0, 63.0] and [c.predicted for c in out] == [40.0, 39.0, 60.0, 58.0]
    assert ranked(out, 11.0)[0].psnr == 30.0  # the measured one keeps its place at its level
    assert corrected(cands[1::2]) == cands[1::2]  # nothing measured: the predictions as they are


def test_a_bad_measured_schedule_is_refused_on_load(cal, tmp_path):
    good = MeasuredSchedule(cut=CUTS[0], key_steps=[0, 2], psnr=40.0).model_dump()
    bad = [({"cut": "blocks.9.ffn"}, "has no cut"), ({"key_steps": [1, 2]}, "start at 0"),
           ({"key_steps": [0, 4]}, "below steps=4"), ({"half_steps": [2]}, "not key steps"),
           ({"psnr": 250.0}, "less than or equal to 200"), ({"psnr": float("nan")}, "psnr")]
    for change, message in bad:
        doc = json.loads(cal.model_dump_json())
        doc["measured"] = [{**good, **change}]
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(PlanFormatError, match=message):
            Calibration.load(path)
    doc = json.loads(cal.model_dump_json())
    doc["measured"] = [good, good]
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanFormatError, match="measured twice"):
        Calibration.load(path)
    with pytest.raises(UnsupportedArgumentError, match="1..16"):
        refine(None, cal, 0)


def test_refine_over_several_calls_averages_their_psnr(wan, cal):
    """``variants``: each call against its own full run, the stored PSNR the mean."""
    g = torch.Generator().manual_seed(9)
    other = {"prompt_embeds": torch.randn(1, 512, 16, generator=g)}
    got = refine(wan, cal, 1, variants=[{}, other], **_kwargs())
    m = got.measured[0]
    kw = {**_kwargs(), "num_inference_steps": cal.steps}
    each = []
    for v in ({}, other):
        full = rehash_video(wan, None, seed=3, **{**kw, **v})
        video = rehash_video(wan, schedule_plan(m.cut, m.key_steps, cal.steps), seed=3, **{**kw, **v})
        each.append(min(200.0, 10 * math.log10(4 / float((video.double() - full.double()).square().mean()))))
    assert each[0] != pytest.approx(each[1], abs=1e-3) and m.psnr == pytest.approx(sum(each) / 2, abs=1e-3)
