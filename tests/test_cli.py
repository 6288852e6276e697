"""The command line on bad input: one line ``error: ...`` on stderr, a non-zero exit, no traceback
(``-v`` shows it); checks that can fail late (the output folder, the cache) run before the work."""

from __future__ import annotations

import json

import pytest

from vramplan import plan_for
from vramplan.cli import main


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plans")
    svd = plan_for(gpu="2080Ti", height=512, width=512, vram_gb=5)
    animatediff = plan_for(gpu="2080Ti", model="animatediff", height=512, width=512)
    rehash = plan_for(gpu="4090", height=512, width=512, rehash="uniform", keys=13)
    return {"svd": str(svd.save(folder / "svd.json")), "animatediff": str(animatediff.save(folder / "ad.json")),
            "rehash": str(rehash.save(folder / "rehash.json")), "folder": folder}


def _text_file(folder, name="notes.txt", data=b"just text"):
    path = folder / name
    path.write_bytes(data)
    return str(path)


CASES = [
    # (argv, fragment of the one-line error)
    (["plan", "--gpu", "2080Ti", "--steps", "-5"], "steps=-5 must be >= 1"),
    (["plan", "--gpu", "2080Ti", "--steps", "0"], "steps=0 must be >= 1"),
    (["plan", "--gpu", "2080Ti", "--vram-gb", "nan"], "vram_gb=nan must be a finite number"),
    (["plan", "--gpu", "2080Ti", "--vram-gb", "inf"], "vram_gb=inf must be a finite number"),
    (["plan", "--gpu", "2080Ti", "--vram-gb", "-3"], "vram_gb=-3.0 must be > 0"),
    (["plan", "--gpu", "2080Ti", "--max-latency", "nan"], "max_latency_s=nan must be a finite number"),
    (["plan", "--gpu", "2080Ti", "--dtype", "bf16"], "RTX 2080 Ti (compute capability 7.5) has no bf16"),
    (["plan", "--gpu", "2080Ti", "--model", "svd-xxl"], "unknown model 'svd-xxl'"),
    (["plan", "--gpu", "2080Ti", "--model", "animatediff", "--frames", "40"], "motion_max_seq_length=32"),
    (["plan", "--gpu", "2080Ti", "--height", "570"], "height=570 is not a multiple of 8"),
    (["plan", "--gpu", "2080Tii"], "unknown GPU '2080Tii'"),
    (["plan", "--gpu", "2080Ti", "-o", "{tmp}/missing/plan.json"], "the folder {tmp}/missing does not exist"),
    (["plan", "--gpu", "2080Ti", "-o", "{tmp}"], "is a folder; give a file name"),
    (["fleet", "--gpus", "2080Ti", "--rate", "-5"], "--rate=-5.0 must be > 0"),
    (["fleet", "--gpus", "2080Ti", "--rate", "inf"], "--rate=inf must be a finite number"),
    (["profile", "--max-k", "0"], "--max-k=0 must be >= 1"),
    (["profile", "--max-k", "-8"], "--max-k=-8 must be >= 1"),
    (["profile", "-o", "{tmp}/missing/prof.json"], "does not exist"),
    (["verify", "/dev/zero"], "/dev/zero is larger than 64 MiB"),
    (["verify", "{tmp}/latin1.json"], "is not UTF-8 text"),
    (["verify", "{tmp}/deep.json"], "nests deeper than 32 levels"),
    (["verify", "{tmp}/nope.json"], "cannot read plan file"),
    (["verify", "{svd}", "--tolerance", "-1"], "--tolerance=-1.0 must be >= 0"),
    (["run", "{svd}"], "needs --image (the conditioning image)"),
    (["run", "{svd}", "--image", "{tmp}/nope.png"], "no such file"),
    (["run", "{svd}", "--image", "{tmp}/notes.txt"], "is not an image PIL can read"),
    (["run", "{svd}", "--image", "{tmp}"], "is a folder"),
    (["run", "{svd}", "--image", "{tmp}/in.png", "--out", "{tmp}/missing/v.gif"], "does not exist"),
    (["run", "{svd}", "--image", "{tmp}/in.png", "--steps", "0"], "--steps=0 must be >= 1"),
    (["run", "{animatediff}"], "needs --prompt"),
    (["run", "{rehash}", "--image", "{tmp}/in.png", "--steps", "10"], "schedule is for 25 steps"),
    (["run", "{svd}", "--image", "{tmp}/in.png", "--out", "{tmp}/v.avi"], "write a .gif or an .mp4"),
    (["run", "{svd}", "--image", "{tmp}/in.png", "--prompt", "a cat"], "takes --image, not --prompt"),
    (["run", "{animatediff}", "--prompt", "a cat", "--image", "{tmp}/in.png"], "takes --prompt, not --image"),
    (["calibrate", "{svd}", "--image", "{tmp}/nope.png"], "no such file"),
    (["calibrate", "{svd}", "--image", "{tmp}/notes.txt"], "is not an image PIL can read"),
    (["calibrate", "{svd}", "--image", "{tmp}/in.png", "--max-gap", "0"], "--max-gap=0 must be >= 1"),
    (["calibrate", "{svd}", "--image", "{tmp}/in.png", "--steps", "0"], "--steps=0 must be >= 1"),
    (["calibrate", "{svd}", "--image", "{tmp}/in.png", "-o", "{tmp}/missing/c.json"], "does not exist"),
    (["calibrate", "{svd}"], "needs --image"),
    (["compare", "{svd}", "--image", "{tmp}/nope.png"], "no such file"),
    (["compare", "{svd}", "--image", "{tmp}/in.png", "--gif", "{tmp}/missing/s.gif"], "does not exist"),
    (["compare", "{animatediff}"], "needs --prompt"),
    (["compare", "{svd}", "--image", "{tmp}/in.png", "--gif", "{tmp}/side.png"], "--gif {tmp}/side.png: write a .gif or an .mp4"),
    (["trained-plan", "--keys", "0"], "--keys=0 must be >= 1"),
    (["trained-plan", "--keys", "40"], "--keys=40 must lie in 1..--steps (25)"),
    (["trained-plan", "--steps", "0"], "--steps=0 must be >= 1"),
    (["trained-plan", "--slices", "0"], "--slices=0 must be >= 1"),
    (["trained-plan", "--rehash", "off", "--keys", "5"], "--keys needs --rehash"),
    (["trained-plan", "-o", "{tmp}/missing/p.json"], "does not exist"),
    (["plan", "--gpu", "4090", "--keys", "13"], "--keys needs --rehash"),
    (["plan", "--gpu", "4090", "--plot", "{tmp}/mem.xyz", "-o", "{tmp}/p.json"], "--plot writes a PNG"),
    (["plan", "--gpu", "4090", "--model", "{tmp}/nope"], "no such folder"),
    (["plan", "--gpu", "4090", "--model", "{tmp}"], "has no model_index.json"),
    (["plan", "--gpu", "4090", "--model", "trained-svd"], "`vramplan trained-plan`"),
    (["plan", "--gpu", "4090", "--calibration", "{tmp}/cal.json"], "--calibration needs --rehash"),
]


@pytest.mark.parametrize("argv, fragment", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_cli_errors_are_one_line_without_traceback(argv, fragment, plans, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))
    _text_file(tmp_path, "latin1.json", b'{"model_name": "svd\xe9"}')
    _text_file(tmp_path, "deep.json", b"[" * 100_000)
    _text_file(tmp_path)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    subs = {"{tmp}": str(tmp_path), "{svd}": plans["svd"], "{animatediff}": plans["animatediff"],
            "{rehash}": plans["rehash"]}

    def fill(s):
        for key, value in subs.items():
            s = s.replace(key, value)
        return s

    assert main([fill(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fill(fragment) in err
    assert "Traceback" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_memory_snapshot_without_cuda_is_an_error_before_loading(plans, tmp_path, capsys, monkeypatch):
    from PIL import Image
    from vramplan.runtime import runner

    monkeypatch.setattr(runner, "load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    argv = ["run", plans["svd"], "--image", str(tmp_path / "in.png"), "--memory-snapshot", str(tmp_path / "s.pickle")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --memory-snapshot") and "no CUDA device" in err and err.count("\n") == 1


@pytest.mark.parametrize("field, value, fragment", [  # integrity: verify fails (exit 1) before running
    ("streamed", ["down_blocks.9"], "'components[unet].streamed' names 'down_blocks.9'"),
    ("host", ["sample"], "'components[unet].host' names 'sample'"),
    ("recompute", ["conv_in"], "'components[unet].recompute' lists conv_in"),
])
def test_verify_names_bad_placement_fields(plans, tmp_path, capsys, field, value, fragment):
    from vramplan.planner.schema import Plan

    plan = Plan.load(plans["svd"])
    unet = plan.component("unet")
    setattr(unet, field, getattr(unet, field) + value)  # after whatever the planner chose
    path = plan.save(tmp_path / "bad.json")
    assert main(["verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and fragment in err, err


def test_pageable_host_memory_is_priced_slower(tmp_path, capsys):
    """--pageable (pinned memory unavailable): the same budget, host-link copies at the pageable rate."""
    from vramplan.planner.errors import InvalidArgumentError

    pinned = plan_for(gpu="2080Ti", model="svd-xt", vram_gb=3.5)
    assert pinned.prediction.transfer_s > 0  # the plan moves values / weights over the host link
    pageable = plan_for(gpu="2080Ti", model="svd-xt", vram_gb=3.5, pinned=False)
    assert pageable.prediction.transfer_s > pinned.prediction.transfer_s
    assert pageable.prediction.latency_s > pinned.prediction.latency_s
    with pytest.raises(InvalidArgumentError, match="pinned='no' must be True or False"):
        plan_for(gpu="2080Ti", pinned="no")
    assert main(["plan", "--gpu", "2080Ti", "--model", "svd-xt", "--vram-gb", "3.5", "--pageable",
                 "-o", str(tmp_path / "p.json")]) == 0
    assert "transfers not hidden behind compute" in capsys.readouterr().out


def test_plan_table_shows_recompute_host_streamed_and_depth(plans):
    from vramplan.planner.schema import Plan

    from vramplan.cli import placement_summary

    comp = next(c for c in Plan.load(plans["svd"]).components if c.groups)  # a grouped component
    for group in comp.groups:
        group.depth = 1
    plain = comp.model_copy(update={"recompute": [], "host": [], "streamed": []})
    assert placement_summary(plain) == ""
    units = list(comp.slices) or ["a", "b"]
    comp = plain.model_copy(update={"recompute": units[:1], "host": units[:2], "streamed": ["mid_block"]})
    comp.groups[0].depth = 4
    line = placement_summary(comp)
    assert "recompute 1 unit;" in line and "host 2 values" in line and "streamed 1 block" in line
    assert "depth 4 on 1 group" in line


def test_verbose_shows_the_traceback(capsys):
    assert main(["-v", "plan", "--gpu", "2080Tii"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "UnknownGPUError" in err
    assert err.rstrip().splitlines()[-1].startswith("error: unknown GPU")


def test_output_folder_is_checked_before_planning(tmp_path, monkeypatch, capsys):
    import vramplan.api

    def never(*args, **kwargs):
        raise AssertionError("planned before checking -o")

    monkeypatch.setattr(vramplan.api, "plan_for", never)
    assert main(["plan", "--gpu", "2080Ti", "-o", str(tmp_path / "no" / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cache_that_is_a_file_is_refused_before_profiling(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from vramplan.runtime import profiler

    blocker = tmp_path / "cache"
    blocker.write_text("")
    monkeypatch.setenv("VRAMPLAN_CACHE", str(blocker))
    monkeypatch.setattr(profiler, "cached_profile", lambda *a, **k: pytest.fail("profiled before checking the cache"))
    assert main(["profile", "--model", "svd", "--height", "768", "--width", "768"]) == 2
    assert "is a file. Set VRAMPLAN_CACHE" in capsys.readouterr().err


def test_more_memory_than_the_card_warns_and_plans(tmp_path):
    """End to end in a fresh process: the warning reaches the terminal through the CLI's logging setup."""
    import subprocess
    import sys

    out = tmp_path / "p.json"
    done = subprocess.run([sys.executable, "-m", "vramplan.cli", "plan", "--gpu", "2080Ti", "--vram-gb", "200",
                           "-o", str(out)], capture_output=True, text=True, check=True)
    assert "vram_gb=200 is more than RTX 2080 Ti has (10.76 GiB usable): planning beyond the card's memory" in done.stderr
    assert json.loads(out.read_text())["target"]["usable_bytes"] == 200 * 2**30


def test_verify_fails_on_a_missing_component_and_on_a_bad_prediction(plans, tmp_path, capsys):
    """A plan with its VAE deleted (the decode would run unsliced) and a UNet prediction 44% low: the
    integrity check refuses it before anything runs (exit 1); the measured comparison of ``failures``
    reports both."""
    data = json.loads(open(plans["svd"]).read())
    data["components"] = [c for c in data["components"] if c["component"] != "vae"]
    for stage in data["stages"]:
        if stage["component"] == "unet":
            stage["activation_bytes"] = int(stage["activation_bytes"] * 0.56)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    assert main(["verify", str(edited)]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err
    assert "field 'components' names unet, image_encoder, vae_encoder, but the pipeline has unet, vae" in captured.err
    from vramplan.planner.schema import Plan
    from vramplan.runtime.verify import VerifyReport, failures

    plan = Plan.load(edited, check=False)
    report = VerifyReport("unet", measured_activation_bytes=100, predicted_activation_bytes=56,
                          measured_needed_bytes=100, peak_label=None, seconds=0.0)
    assert failures(plan, [report], tolerance=0.5) == [  # within 50%: only the missing VAE fails it
        "vae: missing from the plan, so it would run unsliced and unplanned"]
    assert failures(Plan.load(plans["svd"]), [report], tolerance=0.45) == []


def test_readme_plan_commands_work_as_written(tmp_path, monkeypatch, capsys):
    """Every `vramplan plan` example of README.md (except those needing a calibration file) runs."""
    import re
    import shlex
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [m.group(1) for m in re.finditer(r"^(vramplan plan .*)$", readme, re.M)]
    examples = [shlex.split(line, comments=True)[1:] for line in lines if "..." not in line and "--calibration" not in line]
    assert len(examples) >= 5
    for argv in examples:
        assert main(argv) == 0, (argv, capsys.readouterr().err)


def test_output_piped_into_head_is_not_a_traceback():
    """`vramplan schema | head -1`: the reader closing the pipe early ends vramplan quietly."""
    import subprocess
    import sys

    done = subprocess.run(f"{sys.executable} -m vramplan.cli schema | head -c 1", shell=True, capture_output=True,
                          text=True)
    assert done.stdout == "{"
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr


def test_a_plot_name_that_is_not_png_is_refused_before_the_plan_is_written(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "--gpu", "4090", "--plot", str(tmp_path / "mem.xyz"), "-o", str(out)]) == 2
    assert "--plot writes a PNG" in capsys.readouterr().err
    assert not out.exists()


def test_mp4_without_a_video_backend_is_refused_before_the_run(plans, tmp_path, capsys, monkeypatch):
    import importlib.util

    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("imageio_ffmpeg", "av") else real(name, *a))
    assert main(["run", plans["svd"], "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "v.mp4")]) == 2
    assert "writing .mp4 needs a video backend" in capsys.readouterr().err
