"""Pinned host memory is a constraint where plans are chosen (planner/host_budget.py, issue 18 part 2)."""

from __future__ import annotations

from vramplan.planner.gpus import find_gpu
from vramplan.planner.host_budget import run_host, stage_host, within_host
from vramplan.planner.pipeline import PipelinePlanner
from vramplan.planner.plan import shipped_pipeline_profile
from vramplan.planner.solve import solve

GIB = 2**30


def _over_streamed():
    """SVD 512x512 on the 4090, every weight resident, but the UNet's plan streams every block: far more
    pinned host memory than the run needs."""
    profile = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", "flash")
    gpu = find_gpu("RTX 4090")
    planner = PipelinePlanner(profile, gpu, gpu.memory_usable_bytes, 25, "expandable_segments")
    resident = dict.fromkeys(planner.weights, True)
    plain = planner.evaluate(resident, planner.usable)
    solutions = {r.stage.stage: r.solution for r in plain if r.solution is not None}
    stage = next(s for s in profile.stages if s.per_step)
    model = planner.models[stage.stage]
    budget = planner.usable - planner._base(stage, resident, {})
    solutions[stage.stage] = solve(model, budget, streamed=frozenset(model.streamable))
    return planner, resident, solutions, plain, stage.stage


def _host(planner, solutions) -> int:
    return run_host({n: stage_host(planner.models[n], s) for n, s in solutions.items()})


def test_within_host_gives_back_pinned_memory_until_the_run_fits():
    planner, resident, solutions, plain, unet = _over_streamed()
    over = _host(planner, solutions)
    assert over > 2 * GIB
    planner.host_ram_bytes = over // 2
    results = within_host(planner, resident, solutions, planner.usable)
    assert results is not None
    assert _host(planner, solutions) <= over // 2
    assert planner.host_total(results) <= over // 2
    assert all(r.base + r.needed <= planner.usable for r in results)  # still within the GPU
    assert 0 < len(solutions[unet].streamed) < len(planner.models[unet].streamable)


def test_within_host_reaches_the_plan_without_host_memory_when_the_gpu_allows():
    planner, resident, solutions, plain, unet = _over_streamed()
    planner.host_ram_bytes = 0
    results = within_host(planner, resident, solutions, planner.usable)
    assert results is not None and planner.host_total(results) == 0
    assert planner.latency(results) == planner.latency(plain)  # nothing placed or streamed: the fastest plan


def test_a_plan_needing_more_pinned_memory_than_any_fitting_one_is_refused_naming_it():
    import pytest
    from vramplan.planner.errors import InfeasibleError

    from vramplan import plan_for

    with pytest.raises(InfeasibleError, match="pinned host memory") as err:
        plan_for(gpu="RTX 4090", model="svd", height=512, width=512, vram_gb=2.5, host_ram_gb=0.25)
    assert err.value.part == "pinned host memory"


def test_make_plan_keeps_within_the_host_budget():
    import pytest
    from vramplan.planner.errors import InfeasibleError
    from vramplan.planner.plan import make_plan

    profile = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", "flash")
    unet = next(s.profile for s in profile.stages if s.per_step)
    gpu = find_gpu("RTX 4090")
    usable = int(unet.weight_bytes * 0.8 + gpu.cuda_context_bytes)
    free = make_plan(unet, gpu, usable_bytes=usable)
    need = free.prediction.host_bytes
    assert need > 0
    roomy = make_plan(unet, gpu, usable_bytes=usable, host_ram_bytes=2 * need)
    assert roomy.prediction == free.prediction and roomy.target.host_ram_bytes == 2 * need
    try:
        tighter = make_plan(unet, gpu, usable_bytes=usable, host_ram_bytes=need - 1)
    except InfeasibleError as err:
        assert err.part == "pinned host memory"
    else:
        assert tighter.prediction.host_bytes < need and tighter.prediction.peak_bytes <= usable
    with pytest.raises(InfeasibleError, match="pinned host memory") as err:
        make_plan(unet, gpu, usable_bytes=int(unet.weight_bytes * 0.6), host_ram_bytes=GIB // 8)
    assert err.value.part == "pinned host memory"
