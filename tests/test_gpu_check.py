"""bench/gpu_check.py: its CPU smoke mode runs every code path on tiny models, and its latency fit
recovers known constants from synthetic timings."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest
from vramplan.planner.costs import CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.plan import shipped_pipeline_profile

from vramplan import plan_for

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


@pytest.fixture(scope="module")
def svd_segments(gpu_check):
    """The shipped SVD UNet profile, and its segments: every unit whole, and a tight plan's segments."""
    profile = shipped_pipeline_profile("svd", 576, 1024, 14, True, "fp16", "flash")
    unet = next(s.profile for s in profile.stages if s.stage == "denoise")
    plan = plan_for(gpu="H100 SXM", model="svd", vram_gb=6.0)
    model = CostModel(unet, find_gpu("H100 SXM"), "none")
    planned = gpu_check.planned_units(model, plan.component("unet"))
    assert max(s.k for s in planned) > 1
    return unet, gpu_check.whole_units(model.n) + planned


def test_features_reproduce_the_cost_model(gpu_check, svd_segments):
    profile, segments = svd_segments
    gpu = find_gpu("H100 SXM")
    model = CostModel(profile, gpu, "none")
    features = gpu_check.segment_features(profile, gpu, segments)
    constants = gpu_check.current_constants()
    for f, seg in zip(features, segments, strict=True):
        assert gpu_check.predict(f, constants) == pytest.approx(model.cost(seg).seconds, rel=1e-9)
    assert all(c >= 0 and b >= 0 and n >= 1 for c, b, n in features)


@pytest.mark.parametrize("known", [
    {"compute_efficiency": 0.45, "bandwidth_efficiency": 0.8, "launch_seconds": 12e-6},
    {"compute_efficiency": 0.7, "bandwidth_efficiency": 0.55, "launch_seconds": 4e-6},
])
def test_fit_recovers_known_constants(gpu_check, svd_segments, known):
    profile, segments = svd_segments
    features = gpu_check.segment_features(profile, find_gpu("H100 SXM"), segments)
    rng = random.Random(0)
    points = [gpu_check.Point(*f, gpu_check.predict(f, known) * math.exp(rng.gauss(0, 0.03))) for f in features]
    fit = gpu_check.fit_constants(points)
    for name, value in known.items():
        assert fit["constants"][name] == pytest.approx(value, rel=0.05), name
    assert fit["points"] == len(points)
    assert fit["median_abs_rel_error_after"] < 0.05 < fit["median_abs_rel_error_before"]


def test_fit_needs_enough_points(gpu_check):
    with pytest.raises(ValueError, match="at least 3"):
        gpu_check.fit_constants([gpu_check.Point(1e-3, 1e-3, 10, 2e-3)])


def test_cpu_smoke_run(gpu_check, tmp_path, capsys, monkeypatch):
    out = tmp_path / "calibration" / "smoke.json"
    assert gpu_check.main(["--cpu-smoke", "--models", "svd", "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["format"] == "vramplan-gpu-overlay" and data["gpu"] == "RTX 4090"
    record = data["measurement"]
    assert record["smoke"] and record["card"] == record["gpu_profile"]["name"] == "RTX 4090"
    rows = record["rows"]
    assert {(r["stage"], r["run"]) for r in rows} == {
        (stage, run) for stage in ("denoise", "decode") for run in ("original", "plan card", "plan 0.5x")
    }
    for row in rows:
        # on the CPU the tracker measures what the memory model predicts (meta-free, real tensors)
        assert row["allocated_bytes"] == pytest.approx(row["predicted_activation_bytes"], rel=0.03), row
        assert row["measured_s"] > 0 and row["fitted_s"] > 0
    assert any(r["max_k"] > 1 for r in rows if r["run"] == "plan 0.5x")
    constants = record["fit"]["constants"]
    assert constants["launch_seconds"] >= 0 and record["fit"]["points"] > 50
    table = out.with_suffix(".md").read_text()
    assert "| svd | decode | plan 0.5x |" in table and "Fitted over" in table
    assert "wrote" in capsys.readouterr().out

    # the overlay names the card as measured and carries the fitted constants ...
    latency = data["latency"]
    assert latency["source"]["card"] == "CPU (smoke run, tiny models)" and latency["source"]["smoke"]
    for name in ("compute_efficiency", "bandwidth_efficiency", "launch_seconds"):
        assert latency[name] == (None if constants[name] is None else pytest.approx(constants[name])), name
    # ... and planner/gpus.py applies it to the RTX 4090's profile (only), priced with it
    from vramplan.planner import gpus

    monkeypatch.setenv(gpus.CALIBRATION_ENV, str(out.parent))
    gpus.clear_cache()
    try:
        card = find_gpu("RTX 4090")
        assert card.calibrated and card.latency.launch_seconds == pytest.approx(constants["launch_seconds"])
        assert "smoke.json" in card.sources[-1]
        assert not find_gpu("2080Ti").calibrated and find_gpu("2080Ti").latency is None
    finally:
        monkeypatch.delenv(gpus.CALIBRATION_ENV)
        gpus.clear_cache()
    assert not find_gpu("RTX 4090").calibrated


def test_cpu_smoke_default_output_is_not_applied(gpu_check):
    """Without --out a smoke run writes outside profiles/calibration: its numbers mean nothing for the card."""
    gpu = find_gpu("RTX 4090")
    assert gpu_check.default_out(gpu, smoke=False).parent == gpu_check.REPO / "profiles" / "calibration"
    assert gpu_check.default_out(gpu, smoke=True).parent.name == "gpu_check-smoke"


def test_features_follow_the_cards_own_constants(gpu_check, svd_segments):
    """A calibrated card: the features are the same (they depend on the peaks only), and predicting with
    the card's constants reproduces the cost model, which prices with them."""
    from vramplan.planner.schema import LatencyConstants

    profile, segments = svd_segments
    plain = find_gpu("H100 SXM")
    card = plain.model_copy(update={"latency": LatencyConstants(compute_efficiency=0.3, bandwidth_efficiency=None,
                                                                launch_seconds=5e-6)})
    mine, theirs = (gpu_check.segment_features(profile, g, segments) for g in (card, plain))
    assert [x for f in mine for x in f] == pytest.approx([x for f in theirs for x in f], rel=1e-12)
    constants = gpu_check.current_constants(card)
    assert constants == {"compute_efficiency": 0.3, "bandwidth_efficiency": math.inf, "launch_seconds": 5e-6}
    model = CostModel(profile, card, "none")
    for f, seg in zip(gpu_check.segment_features(profile, card, segments), segments, strict=True):
        assert gpu_check.predict(f, constants) == pytest.approx(model.cost(seg).seconds, rel=1e-9)


def test_cpu_smoke_respects_the_time_budget(gpu_check, tmp_path):
    out = tmp_path / "c.json"
    assert gpu_check.main(["--cpu-smoke", "--models", "svd-xt", "--timeout-budget", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    record = data["measurement"]
    assert data["latency"] is None and record["rows"] == [] and record["fit"] is None
    assert any("skipped" in s for s in record["skipped"]) and any("no fit" in s for s in record["skipped"])


def test_unknown_model_is_refused(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--models", "sdxl"])


def test_gpu_cases_plan_every_model_without_torch_work(gpu_check):
    """What a GPU run would check, built from shipped profiles: each model's UNet and decoder with the
    smallest plan (which slices) and the card's plan; an infeasible budget is named, not dropped."""
    gpu = find_gpu("H100 SXM")
    cases = gpu_check.gpu_cases(["svd", "svd-xt", "animatediff"], gpu, 576, 1024, ["floor", "1", "card"])
    # the decode runs along rows at the floor (its alternative plan) and along frames on the card: two cases
    stages = {"svd": ("encode_vae", "denoise", "decode", "decode"), "animatediff": ("denoise", "decode", "decode")}
    assert [(c.model, c.stage) for c in cases] == [
        (m, s) for m in ("svd", "svd-xt", "animatediff") for s in stages[m.removesuffix("-xt")]
    ]
    for case in cases:
        labels = [label for label, _ in case.plans]
        assert labels[0].startswith("plan floor") == (case.component != "vae")
        assert (labels[-1] == "plan H100 SXM") == (case.component != "vae_rows")
        first = case.plans[0][1]
        assert first.shape is not None and first.component == case.component == case.profile.component
        assert case.cls == case.config["_class_name"]
        assert gpu_check.estimate_seconds(case, gpu, 1, 3) > gpu_check.BUILD_SECONDS
    decodes = [c for c in cases if c.stage == "decode"]
    assert [c.component for c in decodes] == ["vae_rows", "vae"] * 3
    assert all(max(c.plans[0][1].slices.values()) > 1 for c in decodes if c.component == "vae_rows")
    assert all(any("plan 1 GiB: infeasible" in n for n in c.notes) for c in cases)  # below every floor


def test_fit_drops_a_term_the_timings_do_not_need(gpu_check, svd_segments, tmp_path):
    """Timings with no launch cost: the launch term is dropped (0 s), and the record stays valid JSON."""
    profile, segments = svd_segments
    features = gpu_check.segment_features(profile, find_gpu("H100 SXM"), segments)
    known = {"compute_efficiency": 0.5, "bandwidth_efficiency": 0.7, "launch_seconds": 0.0}
    fit = gpu_check.fit_constants([gpu_check.Point(*f, gpu_check.predict(f, known)) for f in features])
    assert fit["constants"]["launch_seconds"] == pytest.approx(0.0, abs=1e-9)
    assert fit["constants"]["compute_efficiency"] == pytest.approx(0.5, rel=1e-3)
    assert gpu_check._finite({"a": [math.inf, 1.0]}) == {"a": [None, 1.0]}
