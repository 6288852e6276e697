"""Latency constants per GPU: ``GpuProfile.latency`` (fitted by bench/gpu_check.py, applied from overlay
files by planner/gpus.py) prices segments and whole stages exactly as the constants say. No torch."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from vramplan.planner import costs, gpus
from vramplan.planner.costs import CostModel, Segment, roofline_seconds
from vramplan.planner.errors import InputFileError
from vramplan.planner.plan import shipped_pipeline_profile
from vramplan.planner.schema import GpuProfile, LatencyConstants, LatencySource

from vramplan import plan_for

DEFAULTS = dict(compute_efficiency=costs.COMPUTE_EFFICIENCY, bandwidth_efficiency=costs.BANDWIDTH_EFFICIENCY,
                launch_seconds=costs.LAUNCH_SECONDS)


@pytest.fixture(scope="module")
def unet():
    profile = shipped_pipeline_profile("svd", 576, 1024, 14, True, "fp16", "flash")
    return next(s.profile for s in profile.stages if s.stage == "denoise")


@pytest.fixture()
def calibration_dir(tmp_path, monkeypatch):
    """An empty user overlay folder; the GPU profiles are rebuilt before and after."""
    folder = tmp_path / "calibration"
    folder.mkdir()
    monkeypatch.setenv(gpus.CALIBRATION_ENV, str(folder))
    gpus.clear_cache()
    yield folder
    monkeypatch.delenv(gpus.CALIBRATION_ENV)
    gpus.clear_cache()


def _with(gpu: GpuProfile, **constants) -> GpuProfile:
    """``gpu`` with these constants (validated: a profile with constants of its own is calibrated)."""
    return GpuProfile.model_validate({**gpu.model_dump(), "latency": {**DEFAULTS, **constants}})


def _overlay(folder, name, gpu, **constants):
    latency = {**DEFAULTS, **constants, "source": {"card": gpu, "date": "2026-11-27 15:00 UTC"}}
    path = folder / name
    path.write_text(json.dumps({"format": "vramplan-gpu-overlay", "version": 1, "gpu": gpu, "latency": latency}))
    return path


def _compute_bound(model: CostModel) -> Segment:
    """The unit whose compute term dominates its time most."""
    best = max(range(model.n), key=lambda i: model.units[i].flops / model.flops_per_s
               / max(model.cost(Segment(i, i, 1)).seconds, 1e-30))
    return Segment(best, best, 1)


# ---------------------------------------------------------------------------- the constants price segments
def test_without_constants_a_gpu_is_priced_with_the_defaults(unet):
    gpu = gpus.find_gpu("RTX 4090")
    assert gpu.latency is None and not gpu.calibrated
    default, explicit = CostModel(unet, gpu), CostModel(unet, _with(gpu))
    for seg in default.segments()[:200]:
        assert default.cost(seg).seconds == explicit.cost(seg).seconds
    assert _with(gpu).calibrated  # constants of its own: calibrated


def test_halving_compute_efficiency_doubles_compute_time(unet):
    gpu = gpus.find_gpu("RTX 4090")
    base, half = CostModel(unet, gpu), CostModel(unet, _with(gpu, compute_efficiency=costs.COMPUTE_EFFICIENCY / 2))
    seg = _compute_bound(base)
    unit = unet.units[seg.start]
    compute = unit.flops / (gpu.fp16_tensor_tflops * 1e12 * costs.COMPUTE_EFFICIENCY)
    assert compute > 0.9 * base.cost(seg).seconds  # compute-bound
    assert half.cost(seg).seconds == pytest.approx(base.cost(seg).seconds + compute, rel=1e-12)
    # compute alone (the other terms off): exactly twice
    only = dict(bandwidth_efficiency=None, launch_seconds=0.0)
    one = CostModel(unet, _with(gpu, **only)).cost(seg).seconds
    two = CostModel(unet, _with(gpu, compute_efficiency=costs.COMPUTE_EFFICIENCY / 2, **only)).cost(seg).seconds
    assert one == pytest.approx(compute, rel=1e-12) and two == pytest.approx(2 * one, rel=1e-12)


def test_every_constant_moves_its_own_term(unet):
    gpu = gpus.find_gpu("RTX 4090")
    base = CostModel(unet, gpu)
    seg = Segment(0, 3, 4) if Segment(0, 3, 4) in base.segments() else next(s for s in base.segments() if s.k > 1)
    off = dict(compute_efficiency=None, bandwidth_efficiency=None, launch_seconds=0.0)
    assert CostModel(unet, _with(gpu, **off)).cost(seg).seconds == 0.0
    launches = CostModel(unet, _with(gpu, **{**off, "launch_seconds": 1.0})).cost(seg).seconds
    assert launches == sum(seg.k * u.kernels for u in unet.units[seg.start : seg.stop + 1])
    memory = CostModel(unet, _with(gpu, **{**off, "bandwidth_efficiency": 0.5})).cost(seg).seconds
    memory_full = CostModel(unet, _with(gpu, **{**off, "bandwidth_efficiency": 1.0})).cost(seg).seconds
    assert memory == pytest.approx(2 * memory_full, rel=1e-12) and memory > 0
    slow_launch = CostModel(unet, _with(gpu, launch_seconds=2 * costs.LAUNCH_SECONDS)).cost(seg).seconds
    assert slow_launch == pytest.approx(base.cost(seg).seconds + launches * costs.LAUNCH_SECONDS, rel=1e-12)


def test_link_efficiency_prices_host_copies(unet):
    gpu = gpus.find_gpu("RTX 4090")
    base, half = CostModel(unet, gpu), CostModel(unet, _with(gpu, link_efficiency=0.5))
    assert half.link_bytes_per_s == pytest.approx(base.link_bytes_per_s / 2)
    value = base.placeable[0]
    seg = next(s for s in base.segments() if s.start > base.producer[value] and s.start <= base.last_use[value])
    host = frozenset([value])
    assert base.cost(seg, host).transfer_s > 0
    assert half.cost(seg, host).transfer_s == pytest.approx(2 * base.cost(seg, host).transfer_s, rel=1e-12)
    slow = CostModel(unet, _with(gpu, link_efficiency=0.5), pinned=False)
    assert slow.cost(seg, host).transfer_s == pytest.approx(
        half.cost(seg, host).transfer_s / costs.PAGEABLE_FRACTION, rel=1e-12)


def test_roofline_of_whole_stages_uses_the_constants():
    gpu = gpus.find_gpu("RTX 4090")
    flops, moved = 10**12, 10**10
    base = roofline_seconds(flops, moved, gpu, "fp16")
    compute = flops / (gpu.fp16_tensor_tflops * 1e12 * costs.COMPUTE_EFFICIENCY)
    assert roofline_seconds(flops, moved, _with(gpu, compute_efficiency=0.3), "fp16") == pytest.approx(
        base + compute, rel=1e-12)
    assert roofline_seconds(flops, moved, _with(gpu, compute_efficiency=None), "fp16") == pytest.approx(
        base - compute, rel=1e-12)


def test_constants_are_checked():
    for bad in (dict(compute_efficiency=0.0), dict(bandwidth_efficiency=-1.0), dict(launch_seconds=-1e-6),
                dict(compute_efficiency=float("inf")), dict(link_efficiency=0.0)):
        with pytest.raises(ValueError):
            LatencyConstants(**{**DEFAULTS, **bad})


# ---------------------------------------------------------------------------- overlays
def test_an_overlay_calibrates_its_card_and_its_plans(calibration_dir):
    before = plan_for(gpu="RTX 4090", model="svd")
    assert not before.prediction.latency_calibrated
    path = _overlay(calibration_dir, "rtx-4090.json", "NVIDIA GeForce RTX 4090",
                    compute_efficiency=costs.COMPUTE_EFFICIENCY / 2)
    gpus.clear_cache()
    card = gpus.find_gpu("4090")
    assert card.calibrated and card.latency.compute_efficiency == costs.COMPUTE_EFFICIENCY / 2
    assert card.latency.source == LatencySource(card="NVIDIA GeForce RTX 4090", date="2026-11-27 15:00 UTC")
    assert path.name in card.sources[-1]
    assert gpus.find_gpu("RTX 4090") in gpus.all_gpus() and not gpus.find_gpu("2080Ti").calibrated
    assert gpus.with_memory(card, card.memory_total_bytes // 2).latency == card.latency
    after = plan_for(gpu="RTX 4090", model="svd")
    assert after.prediction.latency_calibrated
    assert after.prediction.latency_s > 1.2 * before.prediction.latency_s  # compute is slower on this card now


def test_a_user_overlay_replaces_a_shipped_one(calibration_dir, monkeypatch, tmp_path, caplog):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    _overlay(shipped, "h100.json", "H100 SXM", launch_seconds=1e-6)
    _overlay(calibration_dir, "h100-mine.json", "NVIDIA H100 80GB HBM3", launch_seconds=3e-6)
    real = gpus.calibration_dirs

    monkeypatch.setattr(gpus, "calibration_dirs", lambda: [shipped, *real()[1:]])
    gpus.clear_cache()
    with caplog.at_level(logging.WARNING, logger=gpus.__name__):
        assert gpus.find_gpu("H100 SXM").latency.launch_seconds == 3e-6
    assert "replaces" in caplog.text


def test_an_overlay_for_an_unknown_card_is_ignored_with_a_warning(calibration_dir, caplog):
    _overlay(calibration_dir, "mystery.json", "NVIDIA Quantum Card 9000", compute_efficiency=0.1)
    gpus.clear_cache()
    with caplog.at_level(logging.WARNING, logger=gpus.__name__):
        profiles = gpus.all_gpus()
    assert not any(g.calibrated for g in profiles)
    assert "mystery.json" in caplog.text and "Quantum Card 9000" in caplog.text


@pytest.mark.parametrize("content, says", [
    ("{not json", "not valid JSON"),
    (json.dumps({"gpu": "RTX 4090", "latency": {**DEFAULTS, "compute_efficiency": -0.5}}),
     "latency.compute_efficiency"),
    (json.dumps({"gpu": "RTX 4090", "latency": {**DEFAULTS, "launch_seconds": "fast"}}), "latency.launch_seconds"),
    (json.dumps({"gpu": "RTX 4090"}), "latency"),
    (json.dumps({"gpu": "RTX 4090", "latency": None, "extra": 1}), "extra"),
    (json.dumps([1, 2]), "malformed"),
])
def test_a_malformed_overlay_is_an_error_naming_the_file(calibration_dir, content, says):
    (calibration_dir / "broken.json").write_text(content)
    gpus.clear_cache()
    with pytest.raises(InputFileError, match="broken.json") as info:
        gpus.find_gpu("RTX 4090")
    assert says in str(info.value)


def test_an_overlay_without_constants_changes_nothing(calibration_dir):
    (calibration_dir / "nofit.json").write_text(json.dumps({"gpu": "RTX 4090", "latency": None}))
    gpus.clear_cache()
    assert not gpus.find_gpu("RTX 4090").calibrated


def test_the_calibration_folder_must_be_a_folder(tmp_path, monkeypatch, caplog):
    file = tmp_path / "file.json"
    file.write_text("{}")
    monkeypatch.setenv(gpus.CALIBRATION_ENV, str(file))
    gpus.clear_cache()
    try:
        with pytest.raises(InputFileError, match="not a folder"):
            gpus.all_gpus()
        monkeypatch.setenv(gpus.CALIBRATION_ENV, str(tmp_path / "missing"))
        gpus.clear_cache()
        with caplog.at_level(logging.WARNING, logger=gpus.__name__):
            assert len(gpus.all_gpus()) == len(gpus.shipped_gpus())
        assert "does not exist" in caplog.text
    finally:
        monkeypatch.delenv(gpus.CALIBRATION_ENV)
        gpus.clear_cache()


def test_overlays_apply_without_torch(tmp_path):
    folder = tmp_path / "calibration"
    folder.mkdir()
    _overlay(folder, "2080ti.json", "NVIDIA GeForce RTX 2080 Ti", launch_seconds=2e-5)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "from vramplan import plan_for\n"
        "plan = plan_for(gpu='2080Ti', model='svd', height=576, width=1024)\n"
        "print(plan.prediction.latency_calibrated, plan.prediction.latency_s)\n"
    )
    env = {**os.environ, gpus.CALIBRATION_ENV: str(folder)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    calibrated, seconds = out.stdout.split()
    assert calibrated == "True"
    assert float(seconds) > plan_for(gpu="2080Ti", model="svd", height=576, width=1024).prediction.latency_s
