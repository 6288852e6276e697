"""Pinned host memory: predicted as the executor allocates it, measured in execution, and budgeted.

The planner's ``host_bytes`` follows the plan's segments (a host output that takes over a dying host
input's buffer allocates nothing); the tracker counts the host buffers a call allocates. Both are
compared on random plans of a tiny VAE and on the full-size SVD-XT VAE (meta tensors), where the
plan places 3.5 GiB values that share one buffer. The host budget is a constraint of the planner.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vramplan.planner.costs import CostModel, Segment
from vramplan.planner.errors import InfeasibleError
from vramplan.planner.gpus import find_gpu
from vramplan.planner.placement import host_bytes
from vramplan.planner.plan import segments_of
from vramplan.planner.schema import ComponentPlan, Group, SampleShape

from vramplan import plan_for
from vramplan.api import ASSUMED_HOST_RAM_GB, host_ram_budget, machine_ram_bytes

GIB = 2**30
SHAPE = SampleShape(batch=1, frames=3, latent_height=6, latent_width=5, dtype="fp32")


@pytest.fixture(scope="module")
def vae_profile(meta_vae):
    from vramplan.runtime.profiler import profile

    return profile(meta_vae, SHAPE, "cpu_flash", name="tiny", max_k=8)


@pytest.fixture(scope="module")
def laptop():
    """SVD-XT 25 x 576x1024 on the 4 GB RTX 3050 Laptop within 7 GiB of pinned host memory."""
    return plan_for(gpu="RTX 3050 Laptop", model="svd-xt", host_ram_gb=7)


@st.composite
def placed_plans(draw, prof, component: str = "vae"):
    """Random groups (with their recompute) and a random set of the values that cross segments."""
    units = prof.units
    slices, groups, recompute, i = {}, [], [], 0
    while i < len(units):
        u = units[i]
        if u.axis is None:
            i += 1
            continue
        j = i + 1
        while j < len(units) and units[j].axis == u.axis and units[j].axis_length == u.axis_length and j - i < 4:
            j += 1
        size = draw(st.integers(1, j - i))
        common = set(u.scratch)
        for v in units[i : i + size]:
            common &= set(v.scratch)
        ks = sorted(k for k in common if k > 1 or size == 1)
        if not ks:
            size, ks = 1, sorted(u.scratch)
        k = draw(st.sampled_from(ks))
        run = units[i : i + size]
        if k > 1:
            slices.update({v.name: k for v in run})
        if size > 1:
            groups.append(Group(units=[v.name for v in run], axis=u.axis, k=k))
            made = set()
            for v in run:
                if v.needs_input_stats and v.inputs and v.inputs[0] in made:
                    recompute.append(v.name)
                made.add(v.name)
        i += size
    comp = ComponentPlan(component=component, model=prof.model, shape=prof.shape, slices=slices, groups=groups,
                         recompute=recompute)
    model = CostModel(prof, find_gpu("RTX 4090"), "none")
    segs = segments_of(model, comp)
    seg_of = {}
    for n, s in enumerate(segs):
        for v in model.units[s.start : s.stop + 1]:
            seg_of[v.name] = n
    crossing = sorted({name for v in units for name in v.inputs
                       if name in seg_of and seg_of[name] < seg_of[v.name] and name != prof.result})
    host = draw(st.lists(st.sampled_from(crossing), unique=True, max_size=len(crossing))) if crossing else []
    return comp.model_copy(update={"host": [u.name for u in units if u.name in host]})


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_predicted_host_memory_is_measured_on_random_plans(meta_vae, vae_profile, data):
    from vramplan.runtime.verify import verify

    comp = data.draw(placed_plans(vae_profile))
    model = CostModel(vae_profile, find_gpu("RTX 4090"), "none")
    predicted = host_bytes(model, frozenset(comp.host), segments_of(model, comp))
    measured = verify(comp, meta_vae).measured_host_bytes
    assert predicted == measured


def test_a_host_output_over_a_dying_host_input_allocates_nothing(vae_profile):
    """Unit by unit (no reuse) two consecutive host values live at once; in one sliced segment the
    second takes over the first's buffer, as the executor does."""
    model = CostModel(vae_profile, find_gpu("RTX 4090"), "none")
    rules = model.rules
    for j, unit in enumerate(model.units):
        if j and unit.axis is not None and 2 in unit.scratch:
            name = unit.inputs[0]
            if (name in model.producer and rules.last_use[name] == j and unit.output_shape
                    == model.units[model.producer[name]].output_shape and rules.last_use[unit.name] > j + 1):
                break
    else:
        pytest.fail("no unit whose output can take over its input's buffer")
    host = frozenset({name, unit.name})
    segs = [Segment(i, i, 1) for i in range(j)] + [Segment(j, j, 2)] + [Segment(i, i, 1) for i in range(j + 1, model.n)]
    assert host_bytes(model, host) == model.size[name] + model.size[unit.name]  # unsliced: a new host copy
    assert host_bytes(model, host, segs) == max(model.size[name], model.size[unit.name])


def test_svd_xt_vae_host_memory_is_measured_at_full_size(laptop):
    """The issue's case: the 4 GB laptop plan places 3.5 GiB decoder values; they need 3.5 GiB of host
    memory (one buffer passed on), not 7.0, and the meta run measures exactly that."""
    from vramplan.runtime.verify import _build, _run

    plan = laptop
    decode = next(s for s in plan.stages if s.stage == "decode")
    vae = plan.component("vae")
    assert vae.host and decode.host_bytes == 25 * 128 * 576 * 1024 * 2  # one full-resolution fp16 value
    report = _run(plan, vae, _build(plan, vae))
    assert report.measured_host_bytes == report.predicted_host_bytes == decode.host_bytes
    assert plan.prediction.host_bytes == decode.host_bytes + sum(s.streamed_bytes for s in plan.stages)


# -- the host budget ------------------------------------------------------------------------------------
def test_a_plan_over_the_host_budget_is_not_chosen():
    free = plan_for(gpu="RTX 4090", model="svd", vram_gb=5)
    assert free.prediction.host_bytes > GIB
    tight = plan_for(gpu="RTX 4090", model="svd", vram_gb=5, host_ram_gb=1)
    assert tight.prediction.host_bytes <= GIB and tight.prediction.peak_bytes <= 5 * GIB
    assert tight.prediction.latency_s >= free.prediction.latency_s
    assert (tight.target.host_ram_bytes, tight.target.host_ram_source) == (GIB, "given")


def test_the_floor_error_names_host_memory_when_it_binds():
    with pytest.raises(InfeasibleError, match=r"needs \d+\.\d\d GiB of pinned host memory, beyond the host memory "
                                              r"budget of 4\.00 GiB") as info:
        plan_for(gpu="RTX 3050 Laptop", model="svd-xt", host_ram_gb=4)
    assert info.value.part == "pinned host memory"


def test_rehash_plans_are_held_to_the_budget_too():
    with pytest.raises(InfeasibleError, match="pinned host memory"):
        plan_for(gpu="RTX 4090", model="svd", vram_gb=5, rehash="uniform", host_ram_gb=1)


def test_pageable_plans_stay_priced_within_the_budget(laptop):
    pageable = plan_for(gpu="RTX 3050 Laptop", model="svd-xt", host_ram_gb=7, pinned=False)
    assert pageable.prediction.latency_s > laptop.prediction.latency_s
    assert pageable.target.pinned is False and pageable.prediction.host_bytes <= 7 * GIB


def test_default_budget_from_the_machine_or_assumed():
    total = machine_ram_bytes()
    assert total and total > GIB
    size, source = host_ram_budget("auto", None)
    assert size == int(total * 0.75) and source.startswith("this machine")
    assert host_ram_budget("2080Ti", None) == (int(ASSUMED_HOST_RAM_GB * GIB), "assumed; set host_ram_gb= / --host-ram-gb")
    assert host_ram_budget("auto", 3.0) == (3 * GIB, "given")
    plan = plan_for(gpu="2080Ti", model="svd")
    assert plan.target.host_ram_bytes == int(ASSUMED_HOST_RAM_GB * GIB) and plan.target.host_ram_source.startswith("assumed")


def test_table_prints_pinned_host_memory_beside_gpu_memory(laptop, tmp_path, capsys):
    import re

    from vramplan.cli import main, plan_table

    text = plan_table(laptop)
    found = re.search(r"pinned host +(\d+\.\d\d) GiB \(placed values (\d+\.\d\d) \+ streamed weights (\d+\.\d\d)\); "
                      r"budget 7\.00 GiB \(given\)", text)
    assert found and float(found[1]) == pytest.approx(laptop.prediction.host_bytes / 2**30, abs=0.006)
    placed = max(s.host_bytes - s.streamed_bytes for s in laptop.stages)
    assert float(found[2]) == pytest.approx(placed / 2**30, abs=0.006)
    header = next(line for line in text.splitlines() if line.startswith("stage "))
    decode = next(line for line in text.splitlines() if line.startswith("decode "))
    stage = next(s for s in laptop.stages if s.stage == "decode")
    assert header.split()[-2:] == ["host", "seconds"] and decode.split()[-2] == f"{stage.host_bytes / 2**30:.2f}"
    assert main(["plan", "--gpu", "2080Ti", "--host-ram-gb", "-1", "-o", str(tmp_path / "p.json")]) == 2
    assert "host_ram_gb=-1" in capsys.readouterr().err
