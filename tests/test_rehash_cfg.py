"""Per-step CFG reuse on a tiny WanPipeline (two DiT calls per step): key steps run both calls whole,
reuse steps run the first call only and give the second the first's output plus the key step's offset;
calibrated, priced and refused where a step makes one call."""

from __future__ import annotations

import pytest
import torch
from test_rehash_residual_runtime import CUT, _call, _pipe
from vramplan.planner.rehash import CfgReuseError, cfg_cut, cfg_split, cut_values, residual_span
from vramplan.planner.schema import RehashPlan
from vramplan.runtime.calibrate import calibrate
from vramplan.runtime.rehash import apply_rehash, flop_counter, measure_cuts

KEYS = [0, 2]


def _rehash(cut):
    return RehashPlan(mode="uniform", cut=cut, steps=4, key_steps=KEYS, quality="uncalibrated",
                      original_unet_flops=1, unet_flops=1, cache_bytes=1)


def _run(pipe, cut, guidance=4.0):
    """The DiT's outputs per call and its FLOPs (every call), under ``cut`` (None: stock)."""
    model, outs = pipe.transformer, []
    hooks = [model.register_forward_hook(lambda m, a, o: outs.append(o[0].clone()))]
    handle = apply_rehash(pipe, _rehash(cut)) if cut is not None else None
    try:
        with torch.no_grad(), flop_counter() as counter:
            pipe(**_call(guidance))
    finally:
        if handle is not None:
            handle.remove()
        for h in hooks:
            h.remove()
    return outs, sum(counter.get_flop_counts().get(type(model).__name__, {}).values())


def test_names():
    assert cfg_split("cfg") == (True, None) and cfg_split(cfg_cut(CUT)) == (True, CUT)
    assert cfg_split(CUT) == (False, CUT) and residual_span(cfg_cut(CUT)) == residual_span(CUT)
    assert cut_values("cfg") == () and cut_values(cfg_cut(CUT)) == cut_values(CUT)


@pytest.mark.parametrize("base", [None, CUT])
def test_reuse_steps_skip_the_second_call(base):
    pipe = _pipe()
    stock, stock_flops = _run(pipe, None)
    outs, flops = _run(pipe, cfg_cut(base))
    assert len(stock) == len(outs) == 8
    if base is None:  # steps 1 and 3 run the DiT once: 6 calls' work of 8
        assert flops == pytest.approx(stock_flops * 6 / 8, rel=1e-9)
    else:
        assert flops < stock_flops * 6 / 8
    for s in KEYS[:1]:  # step 0 is the stock run's
        torch.testing.assert_close(outs[2 * s], stock[2 * s], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[2 * s + 1], stock[2 * s + 1], rtol=1e-5, atol=1e-5)
    for s in (1, 3):
        a = max(k for k in KEYS if k < s)
        offset = outs[2 * a + 1] - outs[2 * a]
        torch.testing.assert_close(outs[2 * s + 1], outs[2 * s] + offset, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(outs[3], stock[3], atol=1e-6)  # the approximation is real


def test_a_pipeline_with_one_call_per_step_is_refused():
    pipe = _pipe()
    with pytest.raises(CfgReuseError, match="twice per step"):
        _run(pipe, "cfg", guidance=1.0)
    assert "step" not in pipe.scheduler.__dict__  # the handle came off
    kwargs = _call(1.0)
    kwargs.pop("generator")
    with pytest.raises(CfgReuseError, match="twice per step"):
        calibrate(pipe, cuts=["cfg"], **kwargs)


def test_calibrated_error_is_the_runs_and_the_price_is_half_a_call():
    pipe = _pipe()
    kwargs = _call(4.0)
    kwargs.pop("generator")
    kwargs.pop("output_type")
    cal = calibrate(pipe, cuts=["cfg", cfg_cut(CUT)], max_gap=2, seed=3, **kwargs)
    assert [c.cut for c in cal.cuts] == ["cfg", cfg_cut(CUT)] and cal.calls_per_step == 2

    def guided(cut):
        seen, inner = [], pipe.scheduler.step
        handle = apply_rehash(pipe, RehashPlan(mode="uniform", cut=cut, steps=4, key_steps=[0, 1, 3],
                                               quality="calibrated", original_unet_flops=1, unet_flops=1,
                                               cache_bytes=0)) if cut else None
        step = pipe.scheduler.step
        pipe.scheduler.step = lambda out, *a, **k: (seen.append(out.clone()), step(out, *a, **k))[1]
        try:
            with torch.no_grad():
                pipe(generator=torch.Generator().manual_seed(3), output_type="latent", **kwargs)
        finally:
            del pipe.scheduler.step
            if handle is not None:
                handle.remove()
            assert pipe.scheduler.step == inner
        return seen

    full = guided(None)
    for entry in cal.cuts:
        g, g2 = full[2], guided(entry.cut)[2]
        assert float((g2 - g).norm() / g.norm()) == pytest.approx(entry.error[1][2], rel=1e-3)
    full_flops, reuse, sizes = measure_cuts(pipe.transformer, cal.shape, ["cfg", cfg_cut(CUT), CUT])
    assert reuse["cfg"] == full_flops // 2 and reuse[cfg_cut(CUT)] == reuse[CUT] // 2
    assert sizes["cfg"] == 16 * 2 * 4 * 6 * 4 and sizes[cfg_cut(CUT)] == sizes["cfg"] + sizes[CUT]
