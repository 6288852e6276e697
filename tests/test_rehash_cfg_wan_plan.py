"""End to end on the trained tiny Wan (two DiT calls per step under CFG): a calibration that measured per-step
CFG reuse next to a residual cut, ``plan_for`` on the model's folder with it, and ``run`` of the plan. The
joint search picks a CFG option where the predictor rates it better than every residual-only schedule
within the same budget, and the run does what the plan says (its reuse steps, its quality)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from vramplan.planner.rehash import cfg_split  # noqa: E402

from vramplan import plan_for  # noqa: E402

CUT = "blocks.0.ffn->blocks.7.ffn"  # block 0 runs, blocks 1-7 are the span (8 blocks)
STEPS, KEYS = 6, 4
SHAPE = dict(height=16, width=16, num_frames=5)  # latents 3 x 4 x 4
# a low guidance scale: the unconditional call's offset from the conditional one barely matters to the guided
# prediction, so reusing it (CFG reuse) costs less quality than reusing the DiT's residual (measured: ~81 vs ~70 dB)
CALL = dict(prompt="a red square moving right", guidance_scale=1.1, **SHAPE)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    from vramplan.runtime import trained_wan
    from vramplan.runtime.calibrate import calibrate

    pipe = trained_wan.load_trained_wan()
    cal = calibrate(pipe, cuts=["cfg", CUT], max_gap=2, seed=0, num_inference_steps=STEPS, **CALL)
    return pipe, cal, str(trained_wan.trained_wan_dir())


def _plan(folder, cal, monkeypatch, cache):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(cache))  # the folder is profiled on meta tensors once, cached here
    return plan_for(gpu="4090", model=folder, height=16, width=16, frames=5, dtype="fp32", steps=STEPS,
                    rehash="optimal", calibration=cal, keys=KEYS)


def _video(pipe, plan=None):
    from vramplan.runtime import run

    kwargs = dict(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt", **CALL)
    if plan is None:
        with torch.no_grad():
            return pipe(**kwargs).frames[0], None
    result = run(plan, pipe=pipe, progress=False, **kwargs)
    return result.frames[0], result.report


def _psnr(a, b):
    return float(10 * torch.log10(1.0 / (a.float() - b.float()).square().mean()))  # frames in [0, 1]


def test_plan_for_picks_cfg_reuse_when_better_and_runs_it(wan, monkeypatch, tmp_path_factory):
    pipe, cal, folder = wan
    assert cal.calls_per_step == 2
    cache = tmp_path_factory.mktemp("cache")
    plan = _plan(folder, cal, monkeypatch, cache)
    # the same search without the CFG options (a calibration that did not see two calls per step)
    plain = _plan(folder, cal.model_copy(update={"calls_per_step": None}), monkeypatch, cache)
    r, p = plan.rehash, plain.rehash
    assert r.cut == "cfg" and not cfg_split(p.cut)[0]
    assert r.predicted_psnr > p.predicted_psnr  # chosen because rated better ...
    assert len(r.key_steps) <= KEYS and r.unet_flops < p.original_unet_flops  # ... within the budget
    assert r.reuse_call_s == pytest.approx(r.key_call_s / 2, rel=1e-3)  # a reuse step: one call of two

    full, _ = _video(pipe)
    ours, report = _video(pipe, plan)
    theirs, _ = _video(pipe, plain)
    assert report.key_steps == r.key_steps and report.reused_steps  # the schedule ran
    # ... and measured better too: CFG reuse keeps the run closer to the full run than the residual cut
    assert _psnr(ours, full) > _psnr(theirs, full) + 3
    assert not torch.allclose(ours, full, atol=1e-6)  # the approximation is real
