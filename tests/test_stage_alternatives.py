"""A stage may run under one of several component plans its pipeline lists (``stage_alternatives``: SVD's
and AnimateDiff's decode along frames, ``vae``, or along rows, ``vae_rows``); the planner takes whichever
plans fastest within the budget, the plan names it, integrity and the runner accept it.

The planner tests need no torch: a hand-made alternative (the shipped decode stage with every unit's
activations halved and its FLOPs tripled: a lower floor, slower) and the shipped profiles' own."""

from __future__ import annotations

import json

import pytest
from vramplan.planner.alternatives import as_planned, plan_problems, variants
from vramplan.planner.errors import InfeasibleError, PlanFormatError, PlanMismatchError
from vramplan.planner.gpus import find_gpu
from vramplan.planner.integrity import problems
from vramplan.planner.pipeline import plan_pipeline
from vramplan.planner.pipelines import pipeline_spec
from vramplan.planner.plan import shipped_pipeline_profile
from vramplan.planner.schema import Plan

GIB = 2**30
HOST = 24 * GIB


def _plan(profile, gb, **kw):
    return plan_pipeline(profile, find_gpu("2080Ti"), usable_bytes=int(gb * GIB), host_ram_bytes=HOST,
                         host_ram_source="assumed", **kw)


def _same(a: Plan, b: Plan) -> bool:
    """The same plan, field for field (the solver's own seconds aside)."""
    return a.model_dump(exclude={"solver"}) == b.model_dump(exclude={"solver"})


def _stage(plan: Plan, name: str):
    return next(s for s in plan.stages if s.stage == name)


@pytest.fixture(scope="module")
def shipped():
    return shipped_pipeline_profile("animatediff", 512, 512, 16, True, "fp16", "flash")


@pytest.fixture(scope="module")
def handmade(shipped):
    """The shipped profile without its alternatives, and with a hand-made one: the decode whose units need
    half the memory at three times the FLOPs."""
    frames = shipped.model_copy(update={"alternatives": []})
    dec = next(s for s in frames.stages if s.stage == "decode")
    units = [u.model_copy(update={"scratch": {k: v // 2 for k, v in u.scratch.items()},
                                  "output_bytes": u.output_bytes // 2, "flops": 3 * u.flops})
             for u in dec.profile.units]
    alt = dec.model_copy(update={"plan_component": "vae_rows",
                                 "profile": dec.profile.model_copy(update={"units": units, "component": "vae_rows"})})
    return frames, frames.model_copy(update={"alternatives": [alt]})


def test_the_specs_list_the_decode_along_rows():
    for name in ("StableVideoDiffusionPipeline", "AnimateDiffPipeline"):
        spec = pipeline_spec(name)
        assert spec.plan_names("decode") == ("vae", "vae_rows") and spec.plan_names("denoise") == ("unet",)
        assert spec.attribute_of("vae_rows") == "vae" and "vae_rows" in spec.plan_components()
    assert pipeline_spec("WanPipeline").plan_names("decode") == ("vae",)


def test_frames_above_its_floor_the_alternative_below(handmade):
    frames, both = handmade
    assert [c for c, _ in variants(both)] == [{"decode": "vae"}, {"decode": "vae_rows"}]
    # where the frames decode fits, it is faster: the plan is the one made without the alternative
    for gb in (3.0, 1.0):
        assert _same(_plan(both, gb), _plan(frames, gb))
    with pytest.raises(InfeasibleError) as low:
        _plan(frames, 0.75)
    plan = _plan(both, 0.75)  # below the frames floor the alternative's halved activations fit
    assert plan.prediction.peak_bytes <= 0.75 * GIB < low.value.min_peak_bytes
    decode = _stage(plan, "decode")
    assert decode.component == "vae_rows"
    rows, vae = plan.component("vae_rows"), plan.component("vae")
    assert rows.attribute == "vae" and rows.shape is not None and rows.resident == vae.resident
    assert vae.shape is None and not vae.slices  # the attribute keeps only its residency
    assert problems(Plan.from_json(plan.to_json()), both) == []  # integrity recomputes it from the alternative
    assert as_planned(both, plan).stages[2].plan_name == "vae_rows" and not as_planned(both, plan).alternatives
    # under a latency limit the smallest peak is taken: the alternative's, where it meets the limit
    loose = _plan(both, 3.0, max_latency_s=1e6)
    assert _stage(loose, "decode").component == "vae_rows"
    assert loose.prediction.peak_bytes < _plan(frames, 3.0, max_latency_s=1e6).prediction.peak_bytes


def test_a_refusal_names_the_lowest_floor(handmade):
    frames, both = handmade
    with pytest.raises(InfeasibleError) as one:
        _plan(frames, 0.3)
    with pytest.raises(InfeasibleError) as two:
        _plan(both, 0.3)
    assert two.value.min_peak_bytes < one.value.min_peak_bytes
    # the floor is exact: just above it plans
    assert _plan(both, two.value.min_peak_bytes / GIB + 0.01).prediction.peak_bytes > 0


def test_the_shipped_profiles_carry_the_rows_decode(shipped):
    """Shipped SVD, SVD-XT and AnimateDiff files: the decode profiled under vae_rows, nothing else."""
    for model, frames in (("svd", 14), ("svd-xt", 25), ("animatediff", 16)):
        for size in ((576, 1024), (512, 512)):
            for kernel in ("flash", "efficient"):
                prof = shipped_pipeline_profile(model, *size, frames, True, "fp16", kernel)
                assert [(a.stage, a.plan_name, a.component) for a in prof.alternatives] == [
                    ("decode", "vae_rows", "vae")], (model, size, kernel)
                alt, dec = prof.alternatives[0], next(s for s in prof.stages if s.stage == "decode")
                assert alt.profile.shape == dec.profile.shape and alt.held_bytes == dec.held_bytes
                assert any(u.axis == "rows" for u in alt.profile.units)
                assert max(k for u in alt.profile.units if u.axis == "rows" for k in u.scratch) <= 64
    # AnimateDiff 512x512 (floors 0.84 GiB frames, 0.63 rows): frames at 2 GiB, rows below the frames floor
    frames_only = shipped.model_copy(update={"alternatives": []})
    assert _same(_plan(shipped, 2.0), _plan(frames_only, 2.0))
    with pytest.raises(InfeasibleError):
        _plan(frames_only, 0.75)
    assert _stage(_plan(shipped, 0.75), "decode").component == "vae_rows"


def test_integrity_refuses_an_alternative_the_pipeline_does_not_list(handmade):
    frames, both = handmade
    plan = _plan(both, 0.75)
    text = plan.to_json()
    # a plan name the pipeline does not know is refused when read
    with pytest.raises(PlanFormatError, match="vae_tiles"):
        Plan.from_json(text.replace('"vae_rows"', '"vae_tiles"'))
    # a stage under a plan its pipeline runs another stage under
    data = json.loads(text)
    data["stages"][2]["component"] = "unet"
    assert any("stages[2].component" in p and "'vae' or 'vae_rows'" in p
               for p in plan_problems(Plan.model_validate(data)))
    # the decode sliced under both plans at once
    data = json.loads(text)
    data["components"] = [c if c["component"] != "vae" else {**c, "shape": data["components"][-1]["shape"]}
                          for c in data["components"]]
    assert any("under vae and vae_rows" in p for p in plan_problems(Plan.model_validate(data)))
    # a rows plan checked against a profile without the alternative: its components do not match
    assert any("components" in p for p in problems(Plan.from_json(text), frames))
    # a profile offering an alternative its pipeline does not list is refused
    bad = both.model_copy(update={"alternatives": [both.alternatives[0].model_copy(update={"plan_component": "x"})]})
    with pytest.raises(PlanMismatchError, match="does not list"):
        _plan(bad, 3.0)
    wan_like = both.model_copy(update={"pipeline": "WanPipeline"})
    with pytest.raises(PlanMismatchError, match="does not list"):
        variants(wan_like)


def test_a_rows_group_takes_its_last_units_slice_counts():
    """A rows group's k splits its last unit's output rows (the cost model's ks): a norm of 144 rows before an
    upsampler to 288 has k = 32 measured only at the upsampler (AnimateDiff 576x1024's rows decode)."""
    from vramplan.planner.integrity import _against_profile
    from vramplan.planner.schema import ComponentPlan, Group

    rows = shipped_pipeline_profile("animatediff", 576, 1024, 16, True, "fp16", "efficient").alternatives[0].profile
    norm, up = "decoder.up_blocks.1.resnets.2.norm2", "decoder.up_blocks.1.upsamplers.0"
    scratch = {u.name: u.scratch for u in rows.units}
    assert 32 not in scratch[norm] and 32 in scratch[up] and 29 in scratch[norm] and 29 not in scratch[up]

    def found(k, group=True):
        comp = ComponentPlan(component="vae_rows", attribute="vae", model=rows.model, shape=rows.shape,
                             slices={norm: k, up: k}, groups=[Group(units=[norm, up], axis="rows", k=k)] if group else [])
        return [p for p in _against_profile(comp, rows) if "did not measure" in p]

    assert found(32) == []
    assert found(29) and found(29)[0].startswith(f"field 'components[vae_rows].slices.{norm}' is 29")
    assert found(32, group=False)  # alone, each unit's own
