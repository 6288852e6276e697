"""--json on every command that prints a table (issue 18, part 4): stdout is the data and nothing
else (it parses as one JSON document); progress and notices go to stderr. Also the phase lines of
``verify`` (a full-size model takes tens of seconds silent otherwise)."""

from __future__ import annotations

import json

import pytest

from vramplan.cli import main


def _parser_options() -> dict[str, set[str]]:
    """Each subcommand's option strings, from the real parser (``--help`` of each)."""
    import argparse

    seen: dict[str, set[str]] = {}
    original = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    seen[name] = {s for a in sub._actions for s in a.option_strings}
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            main(["gpus"])
    finally:
        argparse.ArgumentParser.parse_args = original
    return seen


def test_every_table_command_has_json():
    options = _parser_options()
    tables = ("plan", "gpus", "profile", "verify", "run", "fleet", "calibrate", "compare", "trained-plan")
    assert [c for c in tables if "--json" not in options[c]] == []


def test_fleet_one_model_json(capsys):
    assert main(["fleet", "--gpus", "A10G", "RTX 4090", "--rate", "10", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["model"] == "svd" and data["videos_per_hour"] == 10
    assert "planning svd for 2 GPU types" in captured.err
    rows = {r["gpu"]: r for r in data["rows"]}
    assert set(rows) == {"A10G", "RTX 4090"}
    fitting = [r for r in rows.values() if r["fits"]]
    assert fitting and all(r["gpus_needed"] >= 1 and r["peak_bytes"] > 0 for r in fitting)
    # the table shows the same numbers
    assert main(["fleet", "--gpus", "A10G", "RTX 4090", "--rate", "10"]) == 0
    table = capsys.readouterr().out
    for r in fitting:
        assert f"{r['peak_bytes'] / 2**30:.2f}" in table


def test_fleet_one_model_refuses_output_without_workloads(capsys):
    assert main(["fleet", "--gpus", "A10G", "-o", "f.json"]) == 2
    assert "need --workloads" in capsys.readouterr().err


def test_profile_json_shipped_shape(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))
    assert main(["profile", "--model", "svd", "--height", "512", "--width", "512", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["frames"] == 14 and [p["kernel"] for p in data["profiles"]] == ["flash", "efficient"]
    assert {p["status"] for p in data["profiles"]} == {"shipped"}
    assert "vramplan ships this profile" in captured.err


def test_profile_json_cached_shape(tmp_path, monkeypatch, capsys):
    """A new shape (the profiling stood in for by a relabelled shipped profile, as in test_cli_talks)."""
    pytest.importorskip("torch")
    from vramplan.planner.plan import shipped_pipeline_profile
    from vramplan.runtime import profiler

    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))

    def fake(model, height, width, frames, guidance, dtype, kernel, **_):
        prof = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", kernel)
        return prof.model_copy(update={"height": height, "width": width, "frames": frames})

    monkeypatch.setattr(profiler, "pipeline_profile", fake)
    args = ["profile", "--model", "svd", "--height", "256", "--width", "256", "--frames", "2", "--kernel", "flash"]
    assert main([*args, "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)["profiles"]
    assert record["status"] == "cached" and record["path"].startswith(str(tmp_path / "cache"))
    assert "denoise" in {s["stage"] for s in record["stages"]} and all(s["units"] > 0 for s in record["stages"])
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profiles"][0]["status"] == "already cached"


def test_trained_plan_verify_run_json(weights, tmp_path, capsys):
    """trained-plan, verify and run with --json: stdout parses as JSON; the phase lines are on stderr."""
    from PIL import Image

    plan, gif, image = tmp_path / "plan.json", tmp_path / "v.gif", tmp_path / "in.png"
    Image.new("RGB", (48, 40), (200, 90, 30)).save(image)
    assert main(["trained-plan", "--steps", "2", "--keys", "1", "--slices", "2", "-o", str(plan), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == json.loads(plan.read_text()) and f"wrote {plan}" in captured.err

    assert main(["verify", str(plan), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["ok"] is True and "unet" in {c["component"] for c in data["components"]}
    assert "] [1/" in captured.err and "unet: executing the plan" in captured.err  # a line per component

    assert main(["verify", str(plan)]) == 0  # without --json the phase lines stay on stderr too
    captured = capsys.readouterr()
    assert "[1/" in captured.err and "[1/" not in captured.out

    assert main(["run", str(plan), "--image", str(image), "--out", str(gif), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert len(report["step_seconds"]) == 2 and report["total_seconds"] > 0 and f"wrote {gif}" in captured.err and "loading the pipeline" in captured.err


def test_calibrate_json_has_the_table_numbers(weights, tmp_path, capsys):
    plan, cal = tmp_path / "plan.json", tmp_path / "cal.json"
    assert main(["trained-plan", "--steps", "2", "--keys", "1", "-o", str(plan)]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(plan), "--max-gap", "1", "-o", str(cal), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["calibration"] == str(cal) and data["steps"] == 2 and data["cuts"]
    for row in data["cuts"]:
        assert row["adjacent_similarity_min"] <= row["adjacent_similarity_max"] <= 1 + 1e-6
        assert row["reuse_error_gap1_mean"] >= 0
    assert "calibrating" in captured.err


@pytest.mark.parametrize("argv", [
    ["plan", "--gpu", "2080Tii"],                      # cli.py
    ["fleet", "--gpus", "A10G", "--max-jobs", "1"],    # cli_fleet.py
    ["trained-plan", "--keys", "0"],                   # cli_rehash.py
    ["verify", "/nonexistent/plan.json"],
])
def test_verbose_is_the_same_before_and_after_the_command(argv, capsys):
    """-v works in either place for every command: the traceback of an error; without it, one line."""
    assert main(argv) == 2
    quiet = capsys.readouterr().err
    assert quiet.startswith("error: ") and "Traceback" not in quiet
    for verbose in (["-v", *argv], [argv[0], "-v", *argv[1:]], [*argv, "--verbose"]):
        assert main(verbose) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1] == quiet.strip()
