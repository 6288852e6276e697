"""``max_latency_s``'s bisection probes ask only whether some residency meets the limit (``best(first=True)``),
and its final cap stops residencies slower than the fastest so far (``best(last=True)``): they must answer,
and the plan must be, exactly as with exhaustive probes, also where a residency's fit is not monotone in the
cap (the skip state of the residencies a probe did not reach is settled lazily, ``PipelinePlanner._settle``)."""

from __future__ import annotations

import random

import pytest
from vramplan.planner.gpus import find_gpu
from vramplan.planner.pipeline import SLOW, PipelinePlanner, bisect_peak, plan_pipeline
from vramplan.planner.plan import shipped_pipeline_profile

MIB = 2**20


def _stub(seed: int, noise: float, calls: list):
    """A planner over 3 components (8 residencies) whose ``evaluate`` is a fixed random table: a residency
    fits from a threshold cap on, with ``noise`` of its answers flipped (fit not monotone), its latency
    falling with the cap, some answers SLOW."""
    planner = PipelinePlanner.__new__(PipelinePlanner)
    planner.weights = {"a": 1, "b": 2, "c": 3}
    planner.usable = 256 * MIB
    planner.latency = lambda r: r[0]
    planner.peak = lambda r: r[1]
    rng = random.Random(seed)
    thresholds = {r: rng.randrange(0, 256) * MIB for r in _keys()}

    def evaluate(resident, cap, method="dp", latency_cap=None):
        rkey = tuple(resident.values())
        calls.append((rkey, cap))
        draw = random.Random(hash((seed, rkey, cap)))
        fits = cap >= thresholds[rkey]
        if draw.random() < noise:
            fits = not fits
        if not fits:
            return None
        latency = 1.0 + 10.0 * draw.random() * (1.0 - cap / (512 * MIB))
        if latency_cap is not None and latency > latency_cap and draw.random() < 0.5:
            return SLOW
        return (latency, min(cap, thresholds[rkey] + draw.randrange(MIB)))

    planner.evaluate = evaluate
    return planner


def _keys():
    return [tuple(r.values()) for r in PipelinePlanner.residencies(type("W", (), {"weights": {"a": 1, "b": 2, "c": 3}}))]


@pytest.mark.parametrize("noise", [0.0, 0.15, 0.4])
def test_first_found_probes_bisect_exactly_as_exhaustive_probes(noise):
    for seed in range(60):
        answers = []
        for first in (False, True):
            calls: list = []
            planner = _stub(seed, noise, calls)
            limit = 6.0
            top = planner.best(planner.usable, limit)  # as plan_pipeline: the full memory first (fastest s recorded)
            cap = bisect_peak(planner, 0, planner.usable, limit, first=first) if top is not None else None
            answers.append((top, cap, planner.best(cap, limit, last=first) if cap is not None else None))
        assert answers[0] == answers[1], seed


def test_the_probes_stop_at_the_first_residency_that_meets_the_limit():
    calls_exhaustive: list = []
    calls_first: list = []
    a, b = _stub(3, 0.0, calls_exhaustive), _stub(3, 0.0, calls_first)
    for planner in (a, b):
        planner.best(planner.usable, 6.0)
    n = len(calls_first)
    assert a.best(128 * MIB, 6.0) is not None
    assert b.best(128 * MIB, 6.0, first=True) is not None
    assert len(calls_first) - n < len(calls_exhaustive) - n  # fewer residencies evaluated, same answer


@pytest.mark.parametrize(("model", "h", "w", "frames", "gpu", "factor"), [
    ("svd", 512, 512, 14, "RTX 3060 12GB", 1.05),
    ("animatediff", 512, 512, 16, "RTX 4090", 1.2),
])
def test_bounded_plans_of_shipped_profiles_are_those_of_exhaustive_probes(model, h, w, frames, gpu, factor,
                                                                          monkeypatch):
    card = find_gpu(gpu)
    prof = shipped_pipeline_profile(model, h, w, frames, True, "fp16", card.attention_kernel)
    limit = plan_pipeline(prof, card).prediction.latency_s * factor
    fast = plan_pipeline(prof, card, max_latency_s=limit)
    exhaustive = PipelinePlanner.best  # every probe and the final cap over every residency, as before
    monkeypatch.setattr(PipelinePlanner, "best", lambda self, cap, limit, beat_s=None, first=False, last=False:
                        exhaustive(self, cap, limit, beat_s))
    slow = plan_pipeline(prof, card, max_latency_s=limit)
    assert (fast.prediction.peak_bytes, fast.prediction.latency_s) == (slow.prediction.peak_bytes,
                                                                        slow.prediction.latency_s)
    assert fast.prediction.latency_s <= limit
