"""plan_for on shipped profiles, without torch, and its errors; the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from vramplan.planner.gpus import find_gpu
from vramplan.planner.plan import shipped_profiles

from vramplan import InfeasibleError, UnknownGPUError, VramplanError, plan_for
from vramplan.cli import main


def test_plan_for_imports_no_torch():
    """Its speed is a benchmark (bench/bench_plan_speed.py), not a timed assert."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "from vramplan import plan_for\n"
        "plan = plan_for(gpu='2080Ti', model='svd', height=576, width=1024)\n"
        "print(plan.prediction.peak_bytes, plan.solver.status)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    peak, status = int(out[0]), out[1]
    assert status == "Optimal"
    assert peak < 10.76 * 2**30


def test_every_shipped_config_plans_within_the_gpu():
    assert len([p for p in shipped_profiles() if not p.startswith("wan")]) == 12  # Wan: tests/test_wan_pipeline.py
    for model in ("svd", "svd-xt", "animatediff"):
        for height, width in ((576, 1024), (512, 512)):
            for gpu in ("2080Ti", "RTX 4090"):
                plan = plan_for(gpu=gpu, model=model, height=height, width=width)
                assert plan.prediction.peak_bytes <= plan.target.usable_bytes


def test_tighter_memory_means_more_slicing_and_a_lower_peak():
    loose = plan_for(gpu="2080Ti", model="svd")
    tight = plan_for(gpu="2080Ti", model="svd", vram_gb=5.5)
    assert tight.prediction.peak_bytes < loose.prediction.peak_bytes
    assert tight.prediction.peak_bytes <= 5.5 * 2**30
    def sliced(plan):
        return sum(sum(c.slices.values()) for c in plan.components)

    assert sliced(tight) > sliced(loose)


def test_latency_limit_minimises_memory():
    fastest = plan_for(gpu="RTX 4090", model="svd")
    relaxed = plan_for(gpu="RTX 4090", model="svd", max_latency_s=fastest.prediction.latency_s * 1.05)
    assert relaxed.target.objective == "min_peak"
    assert relaxed.prediction.peak_bytes <= fastest.prediction.peak_bytes
    assert relaxed.prediction.latency_s <= fastest.prediction.latency_s * 1.05 + 1e-6


def test_impossible_budget_names_smallest_peak_stage_and_unit():
    # below the floor with everything placed and streamed: a sliced stage's unit sets it (with the decode
    # along rows where one frame does not fit, the VAE encode's mid-block attention, sliced along rows under
    # its own plan, sets it at 576x1024)
    with pytest.raises(InfeasibleError, match=r"smallest reachable peak is \d+\.\d\d MiB, set by the "
                                              r"(encode_vae|denoise|decode) stage \([\w.]+\).*the largest part is"):
        plan_for(gpu="2080Ti", model="svd", vram_gb=0.5)


def test_weights_alone_too_big():
    with pytest.raises(InfeasibleError, match="cannot fit RTX 2080 Ti"):
        plan_for(gpu="2080Ti", model="svd", vram_gb=0.5)


@pytest.mark.parametrize("model", ["svd", "svd-xt", "animatediff"])
def test_every_paper_setting_fits_a_2080ti(model):
    plan = plan_for(gpu="2080Ti", model=model, height=576, width=1024)
    assert plan.prediction.peak_bytes <= find_gpu("2080Ti").memory_usable_bytes
    assert plan.prediction.original_peak_bytes > find_gpu("2080Ti").memory_usable_bytes


def test_whole_pipeline_plan_fits_a_2080ti_under_6_gib():
    plan = plan_for(gpu="2080Ti", model="svd", vram_gb=6.0)
    assert plan.prediction.peak_bytes <= 6.0 * 2**30
    assert {s.stage for s in plan.stages} == {"encode_image", "encode_vae", "denoise", "decode", "postprocess"}
    assert plan.component("vae").slices and plan.component("unet").slices
    assert not all(c.resident for c in plan.components)  # something is moved off the GPU between stages
    # The original pipeline (all weights resident, all frames decoded at once) needs far more.
    assert plan.prediction.original_peak_bytes > 2.5 * plan.prediction.peak_bytes


def test_unknown_gpu():
    with pytest.raises(UnknownGPUError, match="Did you mean"):
        plan_for(gpu="RTX 4900")


def test_auto_without_a_driver_says_so():
    with pytest.raises(VramplanError, match="no NVIDIA driver|nvidia-ml-py"):
        plan_for(gpu="auto")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=570), "not a multiple of 8"),
        (dict(width=32), "too small"),
        (dict(frames=0), "at least one frame"),
        (dict(dtype="int8"), "choose one of fp16"),
    ],
)
def test_shapes_the_model_cannot_take(kwargs, message):
    with pytest.raises(VramplanError, match=message):
        plan_for(gpu="2080Ti", model="svd", **kwargs)


def test_cli_plan_gpus_schema(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--gpu", "2080Ti", "--vram-gb", "5", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "up_blocks.3" in text and "predicted peak" in text and "solver" in text
    assert json.loads(out.read_text())["target"]["gpu"] == "RTX 2080 Ti"
    assert main(["gpus"]) == 0
    assert "H100 SXM" in capsys.readouterr().out
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "Plan"


def test_cli_reports_user_errors_without_a_traceback(capsys):
    assert main(["plan", "--gpu", "2080Tii"]) == 2
    assert "error: unknown GPU" in capsys.readouterr().err


def test_fleet_capacity_ranks_gpus_and_counts_them():
    from vramplan.planner.fleet import capacity

    rows = capacity(model="svd", gpus=["2080Ti", "RTX 4090", "H100 SXM"], videos_per_hour=100)
    assert [r.gpu for r in rows] == ["H100 SXM", "RTX 4090", "RTX 2080 Ti"]  # fastest first
    for row in rows:
        assert row.fits and row.peak_bytes <= find_gpu(row.gpu).memory_usable_bytes
        assert row.gpus_needed == -(-100 // row.videos_per_hour)
        assert row.videos_per_hour == pytest.approx(3600 / row.seconds_per_video, rel=1e-2)


def test_cli_fleet(capsys):
    assert main(["fleet", "--model", "svd", "--gpus", "2080Ti", "T4", "--rate", "10"]) == 0
    out = capsys.readouterr().out
    assert "RTX 2080 Ti" in out and "T4" in out and "GPUs needed" in out


def test_cli_verify_and_run_without_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    out = tmp_path / "p.json"
    assert main(["plan", "--gpu", "2080Ti", "--height", "512", "--width", "512", "--vram-gb", "5", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    text = capsys.readouterr().out
    assert "unet:" in text and "vae:" in text and "prediction error" in text
    assert main(["run", str(out)]) == 2
    assert "needs --image" in capsys.readouterr().err
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    assert main(["run", str(out), "--image", str(image)]) == 2
    assert "huggingface-cli download" in capsys.readouterr().err


def test_catalogue_points_at_registered_pipelines():
    from vramplan.planner.pipelines import known_pipelines, pipeline_source, pipeline_spec
    from vramplan.profiles import model_catalogue

    assert known_pipelines() == ["AnimateDiffPipeline", "StableVideoDiffusionPipeline", "WanImageToVideoPipeline",
                                 "WanImageToVideoPipeline:A14B", "WanPipeline", "WanPipeline:A14B"]
    for name, entry in model_catalogue().items():
        spec = pipeline_spec(entry["pipeline"])
        assert set(entry["components"]) == set(spec.components), name
        source = pipeline_source(name)
        assert spec.default_frames(source.entry, source.unet_config) == entry["frames"]
        spec.check_frames(entry["frames"], source.unet_config)


def test_pipeline_adapters_do_not_import_the_profiler():
    """The profiler imports the adapters; the adapters never import the profiler (no cycle)."""
    code = (
        "import sys\n"
        "sys.modules['vramplan.runtime.profiler'] = None  # any import of the profiler now fails\n"
        "from vramplan.runtime.adapters import pipeline_adapter\n"
        "print(type(pipeline_adapter('AnimateDiffPipeline')).__name__,\n"
        "      type(pipeline_adapter('StableVideoDiffusionPipeline')).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["AnimateDiffAdapter", "StableVideoDiffusionAdapter"]


def test_pipelines_fix_their_call_arguments():
    from vramplan.planner.pipelines import pipeline_spec

    plan = plan_for(gpu="2080Ti", model="animatediff", height=512, width=512)
    args = pipeline_spec(plan.pipeline).call_arguments(plan)
    assert args == {"height": 512, "width": 512, "num_frames": 16, "decode_chunk_size": 16}
    assert pipeline_spec(plan.pipeline).conditioning == "prompt"
    assert pipeline_spec("StableVideoDiffusionPipeline").conditioning == "image"


def test_fleet_capacity_refuses_bf16_on_gpus_without_it():
    from vramplan.planner.fleet import capacity

    rows = {r.gpu: r for r in capacity(model="svd", dtype="bf16", gpus=["2080Ti", "RTX 4090"])}
    assert not rows["RTX 2080 Ti"].fits and "no bf16" in rows["RTX 2080 Ti"].note
    assert rows["RTX 4090"].fits


def test_dtype_defaults_to_the_models_own():
    """No dtype named: the Wan models plan in bf16 (their shipped profiles, no torch), the others in fp16."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from vramplan import plan_for\n"
        "p = plan_for(gpu='RTX 4090', model='wan2.1-t2v-1.3b', height=480, width=832, frames=81, vram_gb=6)\n"
        "q = plan_for(gpu='2080Ti', model='svd', height=576, width=1024)\n"
        "print(p.components[0].shape.dtype, q.components[0].shape.dtype)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["bf16", "fp16"]
