"""The Step Rehash commands end to end on the shipped trained model (3 steps to stay fast)."""

from __future__ import annotations

import json

from vramplan.cli import main


def test_trained_plan_calibrate_compare(weights, tmp_path, capsys):
    plan, cal, optimal, gif = (tmp_path / n for n in ("plan.json", "cal.json", "opt.json", "side.gif"))
    assert main(["trained-plan", "--steps", "3", "--keys", "2", "-o", str(plan)]) == 0
    assert json.loads(plan.read_text())["rehash"]["key_steps"] == [0, 2]
    capsys.readouterr()
    assert main(["calibrate", str(plan), "--refine", "17", "-o", str(cal)]) == 2  # refused before any run
    assert "at most 16" in capsys.readouterr().err
    assert main(["calibrate", str(plan), "--frontier", "--refine", "1", "--from", str(plan)]) == 2
    assert "not --from" in capsys.readouterr().err
    assert main(["calibrate", str(plan), "--max-gap", "2", "--refine", "1", "-o", str(cal)]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "calibrating every candidate cut(s)" in err and "3/3" in err  # what it does, and the step bar
    data = json.loads(cal.read_text())
    assert data["steps"] == 3 and data["max_gap"] == 2 and cal.with_suffix(".png").exists()
    # measured, then predicted: the best-predicted schedule of each FLOPs level ran on the calibration's call
    assert data["measured"] and f"measured {len(data['measured'])} schedules" in captured.out
    assert main(["trained-plan", "--steps", "3", "--rehash", "optimal", "--keys", "2", "--calibration", str(cal),
                 "-o", str(optimal)]) == 0
    assert json.loads(optimal.read_text())["rehash"]["quality"] == "calibrated"
    capsys.readouterr()
    # the frontier from the saved calibration (no new run): cheaper rows are predicted worse
    front = tmp_path / "front.png"
    assert main(["calibrate", str(plan), "--frontier", "--from", str(cal), "--frontier-plot", str(front),
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["frontier"]
    assert rows and front.stat().st_size > 1000 and "measured" in {r["psnr_source"] for r in rows}
    for cheaper, dearer in zip(rows, rows[1:], strict=False):
        assert cheaper["flops_fewer"] > dearer["flops_fewer"] and cheaper["psnr"] < dearer["psnr"]
    floor = rows[len(rows) // 2]["psnr"]
    floored = tmp_path / "floor.json"
    assert main(["trained-plan", "--steps", "3", "--rehash", "optimal", "--calibration", str(cal), "--min-psnr",
                 str(floor), "-o", str(floored)]) == 0
    r = json.loads(floored.read_text())["rehash"]
    reached = r["predicted_psnr"] if r["measured_psnr"] is None else r["measured_psnr"]  # what it was ranked by
    assert reached >= floor - 0.01 and r["predicted_psnr"] is not None and r["schedule"]
    capsys.readouterr()
    assert main(["trained-plan", "--steps", "3", "--rehash", "optimal", "--calibration", str(cal), "--min-psnr",
                 "900", "-o", str(floored)]) == 2
    assert "best reachable is" in capsys.readouterr().err
    other = tmp_path / "other.json"  # a calibration of another model is refused, naming what to do
    data = json.loads(cal.read_text())
    data["model"]["config_hash"] = "0" * 64
    other.write_text(json.dumps(data))
    assert main(["calibrate", str(plan), "--frontier", "--from", str(other)]) == 2
    assert "Calibrate this model" in capsys.readouterr().err
    assert main(["compare", str(optimal), "--gif", str(gif)]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "UNet FLOPs" in out and gif.stat().st_size > 0


def test_plan_rehash_errors_are_clear(capsys):
    assert main(["plan", "--model", "svd", "--gpu", "4090", "--rehash", "greedy", "-o", "/dev/null"]) == 2
    assert "needs a calibration" in capsys.readouterr().err


def test_run_a_trained_plan_from_the_command_line(weights, tmp_path, capsys):
    """`vramplan run` on a `trained-plan` plan uses the shipped model (it is not on the Hugging Face hub)."""
    from PIL import Image

    plan, gif, image = tmp_path / "plan.json", tmp_path / "v.gif", tmp_path / "in.png"
    Image.new("RGB", (48, 40), (200, 90, 30)).save(image)
    assert main(["trained-plan", "--steps", "2", "--keys", "1", "-o", str(plan)]) == 0
    capsys.readouterr()
    assert main(["run", str(plan), "--image", str(image), "--out", str(gif)]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and gif.stat().st_size > 0
    with Image.open(gif) as video:
        assert video.n_frames == 8


def test_no_transformers_advisories_without_verbose(weights, tmp_path):
    """transformers' advice about torchvision is noise to a vramplan user (`-v` keeps it)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    done = subprocess.run([sys.executable, "-m", "vramplan.cli", "trained-plan", "--rehash", "off", "--steps", "2",
                           "-o", str(tmp_path / "p.json")], capture_output=True, text=True, env=env, check=True)
    assert "[transformers]" not in done.stderr, done.stderr


def test_verify_a_trained_plan(weights, tmp_path, capsys):
    """`vramplan verify` on a trained-plan plan measures the trained model's components on meta tensors
    (it is no catalogue model) and says that such a plan has no predictions to check."""
    plan = tmp_path / "plan.json"
    assert main(["trained-plan", "--steps", "2", "--keys", "1", "--slices", "2", "-o", str(plan)]) == 0
    capsys.readouterr()
    assert main(["verify", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "unet: batch 2 x 8 frames x 16x16 latents" in out and "vae:" in out
    assert "no predictions to check" in out
