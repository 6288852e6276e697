"""The command line talks (issue 18, part 4): --version, defaults in --help, --json, -o overwrites,
torch threads said, profile says where it cached and for which kernel."""

from __future__ import annotations

import json

import pytest

from vramplan.cli import HelpFormatter, default_threads, main


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    from vramplan import __version__

    assert capsys.readouterr().out.strip() == f"vramplan {__version__}"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 25)" in out and "(default: expandable_segments)" in out and "(default: auto)" in out
    assert "(default: None)" not in out and "(default: False)" not in out
    assert issubclass(HelpFormatter, object)


def test_plan_json_and_overwrite(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "--gpu", "2080Ti", "--model", "svd", "-o", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["target"]["gpu"] == "RTX 2080 Ti" and json.loads(out.read_text()) == plan
    assert "planned the fastest plan in" in captured.err and f"wrote {out}" in captured.err
    assert main(["plan", "--gpu", "2080Ti", "--model", "svd", "-o", str(out)]) == 0
    assert f"overwrote {out} (it existed)" in capsys.readouterr().out


def test_gpus_json(capsys):
    assert main(["gpus", "--json"]) == 0
    gpus = json.loads(capsys.readouterr().out)
    assert {"RTX 2080 Ti", "RTX 4090"} <= {g["name"] for g in gpus}


def test_threads_default_is_one_on_few_cores(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert default_threads() == 8


def test_threads_are_set_and_said(monkeypatch, capsys, tmp_path):
    pytest.importorskip("torch")
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:  # schema is not a torch command; `profile --regenerate-shipped` would be slow: use a failing verify
        bad = tmp_path / "missing.json"
        assert main(["--threads", "1", "verify", str(bad)]) == 2
        assert torch.get_num_threads() == 1
        assert main(["--threads", "0", "gpus"]) == 2
        assert "--threads=0 must be >= 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_profile_of_a_shipped_shape_says_plan_uses_it(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))
    assert main(["profile", "--model", "svd", "--height", "512", "--width", "512"]) == 0
    out = capsys.readouterr().out
    assert "flash attention: vramplan ships this profile" in out and "efficient attention: vramplan ships" in out


def test_profile_caches_both_kernels_where_plan_finds_them(tmp_path, monkeypatch, capsys):
    """A new shape: `profile` says where it cached each kernel's pipeline profile, and what `plan`
    reads (api.find_pipeline_profile) then comes from that cache for either kernel, without profiling
    again. The profiling itself is stood in for by a shipped profile relabelled (real profiling of a
    new shape takes minutes; tests/test_profiler.py covers it)."""
    pytest.importorskip("torch")
    from vramplan.planner.plan import shipped_pipeline_profile
    from vramplan.runtime import profiler

    from vramplan.api import find_pipeline_profile

    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake(model, height, width, frames, guidance, dtype, kernel, **_):
        calls.append(kernel)
        prof = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", kernel)
        return prof.model_copy(update={"height": height, "width": width, "frames": frames})

    monkeypatch.setattr(profiler, "pipeline_profile", fake)
    assert main(["profile", "--model", "svd", "--height", "256", "--width", "256", "--frames", "2"]) == 0
    out = capsys.readouterr().out
    assert calls == ["flash", "efficient"]
    folder = tmp_path / "cache" / "profiles"
    for kernel in ("flash", "efficient"):
        assert f"{kernel} attention: cached in {folder}" in out
        assert find_pipeline_profile("svd", 256, 256, 2, True, "fp16", kernel).attention_kernel == kernel
    assert calls == ["flash", "efficient"]  # plan's lookup found both in the cache
    assert "now plans without profiling, for GPUs with flash or efficient attention" in out
