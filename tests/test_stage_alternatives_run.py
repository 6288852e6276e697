"""A pipeline plan whose decode runs under its alternative (``vae_rows``: the decoder along rows, on the
pipeline's ``vae``) runs end to end and equals the stock pipeline's output (tiny SVD and AnimateDiff, fp32)."""

from __future__ import annotations

import torch
from vramplan.planner.schema import ComponentPlan, Plan
from vramplan.runtime import uniform_pipeline_plan
from vramplan.runtime.apply import fingerprint, uniform_component
from vramplan.runtime.runner import run
from vramplan.runtime.tiny import tiny_animatediff_pipeline, tiny_svd_pipeline
from vramplan.runtime.verify import missing_components

SIZE, FRAMES, K = 32, 5, 3


def rows_decode_plan(pipe) -> Plan:
    """The uniform plan with its decode moved to ``vae_rows`` (k rows slices, grouped): ``vae`` keeps only
    its residency, as the planner writes a plan whose decode took the alternative."""
    plan = uniform_pipeline_plan(pipe, K, SIZE, SIZE, FRAMES)
    vae = plan.component("vae")
    rows = uniform_component(pipe.vae, K, vae.shape, component="vae_rows").model_copy(update={"attribute": "vae"})
    assert rows.component == "vae_rows" and rows.slices
    whole = ComponentPlan(component="vae", model=fingerprint(pipe.vae))
    components = [whole if c.component == "vae" else c for c in plan.components] + [rows]
    return Plan.model_validate(plan.model_copy(update={"components": components}).model_dump())


def _assert_runs_as_stock(pipe, **kwargs):
    kwargs["output_type"] = "pt"
    expected = pipe(height=SIZE, width=SIZE, num_frames=FRAMES, decode_chunk_size=FRAMES,
                    generator=torch.Generator().manual_seed(0), **kwargs).frames
    plan = rows_decode_plan(pipe)
    assert missing_components(plan) == []  # the decode is sliced, under its alternative
    result = run(plan, pipe=pipe, generator=torch.Generator().manual_seed(0), progress=False, **kwargs)
    torch.testing.assert_close(result.frames, expected, rtol=1e-5, atol=1e-5)
    assert "decode" not in pipe.vae.__dict__  # the rows plan is removed afterwards
    return result


def test_svd_with_the_rows_decode_equals_the_stock_pipeline(image):
    result = _assert_runs_as_stock(tiny_svd_pipeline(), image=image, num_inference_steps=2)
    assert [s.stage for s in result.report.stages] == ["encode_image", "encode_vae", "denoise", "decode"]


def test_animatediff_with_the_rows_decode_equals_the_stock_pipeline():
    g = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 7, 16, generator=g), negative_prompt_embeds=torch.randn(1, 7, 16, generator=g))
    pipe = tiny_animatediff_pipeline()
    result = _assert_runs_as_stock(pipe, num_inference_steps=2, **embeds)
    assert result.report.stages[2].stage == "decode"
    # the decode really ran along rows: it needs less than the decode unsliced (the uniform plan at k = 1)
    whole = run(uniform_pipeline_plan(pipe, 1, SIZE, SIZE, FRAMES), pipe=pipe, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0), progress=False, **embeds)
    assert result.report.stages[2].peak_bytes < whole.report.stages[2].peak_bytes


def test_a_decode_sliced_under_neither_plan_is_missing():
    plan = rows_decode_plan(tiny_animatediff_pipeline())
    assert missing_components(plan) == []
    # vae unsliced and no rows plan: the decode would run whole
    plan = plan.model_copy(update={"components": [c for c in plan.components if c.component != "vae_rows"]})
    assert missing_components(plan) == ["vae"]
