"""``vramplan calibrate`` on a Wan plan (the trained tiny Wan's, its weights stood in for by the same
architecture with random weights): residual and CFG-reuse cuts measured, the frontier searched over both."""

from __future__ import annotations

import json

import pytest
from vramplan.planner.rehash import Calibration

from vramplan.cli import main

CUT = "blocks.0.ffn->blocks.6.ffn"


@pytest.fixture(scope="module")
def untrained():
    """The trained tiny Wan's architecture (its VAE 2x temporal, as the plan's header check reads from the
    shipped configs), random weights."""
    from vramplan.runtime import trained_wan

    return trained_wan.build_pipeline(0)


@pytest.fixture
def wan(untrained, monkeypatch):
    from vramplan.runtime import trained_wan

    monkeypatch.setattr(trained_wan, "load_trained_wan", lambda path=None: untrained)
    return untrained, trained_wan


def _plan(pipe, name="trained-tiny-wan", latent_frames=3):
    """A plan of the trained tiny Wan's kind at a small shape (5 frames 16x16: 3 x 4 x 4 latents)."""
    import torch
    from vramplan.planner.schema import Plan
    from vramplan.runtime.apply import sample_shape, uniform_component

    comp = uniform_component(pipe.transformer, 1, sample_shape(torch.zeros(1, 8, latent_frames, 4, 4), pipe.transformer))
    return Plan(pipeline="WanPipeline", model_name=name, height=16, width=16, frames=5, components=[comp])


def test_calibrate_a_wan_plan_and_its_frontier(wan, tmp_path, capsys):
    pipe, trained_wan = wan
    plan = _plan(pipe).save(tmp_path / "plan.json")
    cal = tmp_path / "cal.json"
    assert main(["calibrate", str(plan), "--steps", "3", "--max-gap", "2", "--cuts", "cfg", CUT, f"cfg+{CUT}",
                 "-o", str(cal), "--frontier", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    loaded = Calibration.load(cal)
    assert [c.cut for c in loaded.cuts] == ["cfg", CUT, f"cfg+{CUT}"] and loaded.calls_per_step == 2
    assert loaded.pipeline == "WanPipeline" and loaded.shape.frames == 3
    assert len(loaded.sigmas) == 3 and loaded.flow_matching  # FlowMatchEuler's noise levels, probed
    rows = out["frontier"]
    assert rows and all(r["cut"] in ("cfg", CUT, f"cfg+{CUT}") for r in rows)
    # the frontier: cheapest first, each row predicted better than every cheaper one
    assert [r["flops_fewer"] for r in rows] == sorted((r["flops_fewer"] for r in rows), reverse=True)
    psnr = [r["predicted_psnr"] for r in rows]
    assert psnr == sorted(psnr) and len(set(psnr)) == len(psnr)


def test_a_wan_plan_needs_a_prompt(wan, tmp_path, capsys):
    pipe, _ = wan
    path = _plan(pipe, "my-wan", 2).save(tmp_path / "plan.json")  # a Wan not shipped: 4x, as Wan's
    assert main(["calibrate", str(path), "--steps", "3"]) == 2
    assert "needs --prompt" in capsys.readouterr().err
