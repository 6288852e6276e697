"""Pinned host memory that cannot be allocated (container limits): the run falls back to pageable memory
with a warning, and its report carries the plan's latency re-priced at the pageable rate."""

from __future__ import annotations

import warnings

import pytest
import torch
from vramplan.planner.costs import PAGEABLE_FRACTION, CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.pipeline import stage_seconds
from vramplan.planner.plan import component_costs
from vramplan.planner.schema import Plan
from vramplan.runtime import executor, streaming, uniform_pipeline_plan
from vramplan.runtime.executor import Segment, execute, watching_pinning
from vramplan.runtime.program import Op, Program, UnitSpec
from vramplan.runtime.runner import _stage_profiles, pageable_latency, run
from vramplan.runtime.tiny import tiny_svd_pipeline

from vramplan import plan_for

SIZE, FRAMES = 32, 5


# ---------------------------------------------------------------------------- failing to pin, simulated
def fail_pinning_host_buffers(monkeypatch):
    """The executor's host buffers as under a CUDA computation (pinned), and pinning failing."""
    real_init, real_empty = executor._Run.__init__, torch.empty

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.pin = True

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("cannot pin: container limit")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(executor._Run, "__init__", init)
    monkeypatch.setattr(torch, "empty", empty)


def fail_pinning_weights(monkeypatch):
    """The weight streamer as under a CUDA call (host copies pinned), and pinning failing."""
    real_offload = streaming.WeightStreamer.offload

    def no_pinning(like):
        raise RuntimeError("cannot lock memory (container limit)")

    monkeypatch.setattr(streaming, "_allocate_pinned", no_pinning)
    monkeypatch.setattr(streaming.WeightStreamer, "offload",
                        lambda self, compute=None: real_offload(self, compute=torch.device("cuda")))


def _toy():
    def double(ctx, t):
        return t * 2

    ops = [Op(UnitSpec(n, "frames"), (i,), n, double) for i, n in [("x", "a"), ("a", "b"), ("b", "c")]]
    return Program(ops, {"x": torch.ones(4, 2, 3, 3)}, {"x": "nchw"}, "c", lambda t: t)


def test_the_executors_pinning_failures_are_watched(monkeypatch):
    """One warning and one recorded failure per call that falls back; nested watchers see it too; a call
    outside any watcher records nothing and still works."""
    fail_pinning_host_buffers(monkeypatch)
    expected = torch.ones(4, 2, 3, 3) * 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with watching_pinning() as outer:
            program = _toy()
            out = execute(program, [Segment([op], "frames", 2) for op in program.ops], host=("a", "b"))
            assert torch.equal(out, expected)
            with watching_pinning() as inner:
                program = _toy()
                execute(program, [Segment([op], "frames", 2) for op in program.ops], host=("a",))
        program = _toy()
        assert torch.equal(execute(program, [Segment([op], "frames", 1) for op in program.ops], host=("a",)), expected)
    assert len(outer) == 2 and len(inner) == 1 and "container limit" in inner[0]
    assert sum("pageable" in str(w.message) for w in caught) == 3
    assert getattr(executor._pinning, "watchers", []) == []


# ---------------------------------------------------------------------------- a run that falls back
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny SVD pipeline saved as a folder, and a plan for it from plan_for (its profile cached)."""
    folder = tmp_path_factory.mktemp("pageable")
    pipe = tiny_svd_pipeline()
    pipe.save_pretrained(folder / "tiny-svd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VRAMPLAN_CACHE", str(folder / "cache"))
        plan = plan_for(gpu="2080Ti", model=str(folder / "tiny-svd"), height=SIZE, width=SIZE, dtype="fp32", steps=2)
        yield pipe, plan, folder


@pytest.fixture()
def cache(tiny, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tiny[2] / "cache"))


def _with(plan: Plan, component: str, **fields) -> Plan:
    comps = [c.model_copy(update=fields) if c.component == component else c for c in plan.components]
    return Plan.model_validate(plan.model_copy(update={"components": comps}).model_dump())


def _run(pipe, plan, image):
    return run(plan, pipe=pipe, image=image, num_inference_steps=plan.target.steps, output_type="pt",
               generator=torch.Generator().manual_seed(0), progress=False)


def _unet_model(plan, pinned=True):
    profile, _ = _stage_profiles(plan)
    unet = next(s.profile for s in profile.stages if s.stage == "denoise")
    return CostModel(unet, find_gpu(plan.target.gpu), plan.target.allocator, pinned=pinned)


def test_a_run_whose_host_values_cannot_be_pinned_is_repriced(tiny, cache, image, monkeypatch):
    pipe, plan, _ = tiny
    model = _unet_model(plan)
    value = next(v for v in model.placeable if model.last_use[v] > model.producer[v] + 1)
    placed = _with(plan, "unet", host=[value])
    expected = _run(pipe, placed, image)
    assert expected.report.predicted_pageable_latency_s is None  # pinned (here: nothing to pin) worked
    assert not any("pageable" in n for n in expected.report.notes)

    fail_pinning_host_buffers(monkeypatch)
    with pytest.warns(RuntimeWarning, match="pageable"):
        result = _run(pipe, placed, image)
    monkeypatch.undo()
    torch.testing.assert_close(result.frames, expected.frames, rtol=0, atol=0)
    report = result.report
    # the UNet's copies at half the rate: its transfer time once more, per call (2 steps)
    transfer = sum(c.transfer_s for _, c in component_costs(model, placed.component("unet")))
    assert transfer > 0
    was = placed.prediction.latency_s
    assert report.predicted_latency_s == was
    assert report.predicted_pageable_latency_s == pytest.approx(
        was + 2 * transfer * (1 / PAGEABLE_FRACTION - 1), abs=1e-4)
    notes = " ".join(report.notes)
    assert "host-placed values used pageable memory" in notes and "container limit" in notes
    assert f"at the pageable rate (was {was:.3g} s pinned)" in notes
    assert "pinned host memory failed" in report.summary()


def test_a_run_whose_streamed_weights_cannot_be_pinned_is_repriced(tiny, cache, image, monkeypatch):
    pipe, plan, _ = tiny
    fail_pinning_weights(monkeypatch)
    model = _unet_model(plan)
    streamed = _with(plan, "unet", streamed=list(model.streamable[::2]))
    with pytest.warns(RuntimeWarning, match="pageable"):
        report = _run(pipe, streamed, image).report
    notes = " ".join(report.notes)
    assert "unet: pinned host memory could not be allocated" in notes and "streamed weights used pageable" in notes
    slow, fast = _unet_model(plan, pinned=False), model
    comp = streamed.component("unet")
    # the stall the slower copies expose, once per UNet call (2 steps)
    calls = next(s.calls for s in streamed.stages if s.component == "unet")
    assert calls == 2
    per_call = slow.streaming_seconds(frozenset(comp.streamed))[1] - fast.streaming_seconds(frozenset(comp.streamed))[1]
    extra = calls * per_call
    assert report.predicted_pageable_latency_s == pytest.approx(streamed.prediction.latency_s + extra, abs=1e-4)
    assert extra > 0 and report.predicted_pageable_latency_s > report.predicted_latency_s
    assert "at the pageable rate" in notes


def test_repricing_is_unavailable_without_the_profile(tiny, tmp_path, monkeypatch):
    pipe, plan, _ = tiny
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "empty"))
    seconds, note = pageable_latency(plan)
    assert seconds is None and "re-pricing is unavailable" in note and "no shipped or cached profile" in note
    seconds, note = pageable_latency(uniform_pipeline_plan(pipe, 2, SIZE, SIZE, FRAMES))
    assert seconds is None and "re-pricing is unavailable (the plan has no per-stage prediction)" in note


def test_a_run_of_a_plan_without_prediction_says_the_repricing_is_unavailable(tiny, image, monkeypatch):
    pipe, _, _ = tiny
    fail_pinning_weights(monkeypatch)
    uniform = uniform_pipeline_plan(pipe, 2, SIZE, SIZE, FRAMES)
    from vramplan.runtime.adapters import adapter_for
    from vramplan.runtime.streaming import streamable_blocks

    comp = uniform.component("unet")
    comp.streamed = list(streamable_blocks(pipe.unet, comp.shape, adapter_for(pipe.unet).method))[:1]
    with pytest.warns(RuntimeWarning, match="pageable"):
        report = run(uniform, pipe=pipe, image=image, num_inference_steps=1, output_type="pt", progress=False).report
    assert report.predicted_pageable_latency_s is None
    assert any("re-pricing is unavailable" in n for n in report.notes)


# ---------------------------------------------------------------------------- the re-pricing itself
@pytest.mark.parametrize("rehash", ["off", "uniform"])
def test_repricing_agrees_with_the_planners_pageable_pricing(rehash):
    """A plan made with pinned=False, priced by the re-pricing's stage pricing at the pageable rate, gives
    the planner's own stage times (less moving non-resident weights, which pinning does not change); a
    plan made with pinned memory costs more at the pageable rate."""
    for pinned in (True, False):
        plan = plan_for(gpu="2080Ti", model="svd", vram_gb=4.5, rehash=rehash, pinned=pinned)
        profile, _ = _stage_profiles(plan)
        weights = {c.component: c.weight_bytes for c in profile.components}
        gpu = find_gpu("2080Ti")
        for stage in profile.stages:
            if stage.profile is None:
                continue
            pred = next(s for s in plan.stages if s.stage == stage.stage)
            comp = plan.component(stage.plan_name)
            model = CostModel(stage.profile, gpu, plan.target.allocator, pinned=pinned)
            # every plan's streamed blocks of this model stay on the host (the VAE: its decode's and its encode's)
            of_model = {s.stage for s in profile.stages if s.component == stage.component}
            streamed = sum(s.streamed_bytes for s in plan.stages if s.stage in of_model)
            moved = 0.0 if comp.resident else 2 * (weights[stage.component] - streamed) / (gpu.pcie_gbps * 1e9)
            assert stage_seconds(plan, pred, model, stage.per_step) + moved == pytest.approx(pred.seconds, abs=2e-4), stage.stage
        if pinned:
            seconds, note = pageable_latency(plan)
            assert seconds > plan.prediction.latency_s and note.startswith(f"predicted {seconds:.2f} s at the pageable")
