"""Pinned host memory of plans along rows: the rows executor writes each host output slice by slice
into a buffer of its own (a slab's halo still reads its input's rows, so an output never takes over a
dying input's buffer); the planner's ``host_bytes`` counts it so. Random plans of the tiny SVD decoder's
rows lowering (``vae_rows``), measured on meta."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_host_memory import placed_plans
from vramplan.planner.costs import CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.placement import host_bytes
from vramplan.planner.plan import segments_of
from vramplan.planner.schema import SampleShape

SHAPE = SampleShape(batch=1, frames=2, latent_height=7, latent_width=5, dtype="fp32")


@pytest.fixture(scope="module")
def rows_profile(meta_vae):
    from vramplan.runtime.profiler import profile

    prof = profile(meta_vae, SHAPE, "cpu_flash", name="tiny", max_k=4, component="vae_rows")
    assert any(u.axis == "rows" for u in prof.units)
    return prof


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_predicted_host_memory_along_rows_is_measured(meta_vae, rows_profile, data):
    from vramplan.runtime.verify import verify

    comp = data.draw(placed_plans(rows_profile, "vae_rows"))
    model = CostModel(rows_profile, find_gpu("RTX 4090"), "none")
    predicted = host_bytes(model, frozenset(comp.host), segments_of(model, comp))
    assert predicted == verify(comp, meta_vae).measured_host_bytes


def test_a_rows_output_never_takes_over_its_dying_input(meta_vae, rows_profile):
    """Where a sliced unit along frames would write its host output over its dying host input, one
    along rows cannot (its halo rows are still read): both buffers are alive, as measured."""
    from vramplan.planner.schema import ComponentPlan
    from vramplan.runtime.verify import verify

    model = CostModel(rows_profile, find_gpu("RTX 4090"), "none")
    rules = model.rules
    for j, unit in enumerate(model.units):
        if j and unit.axis == "rows" and 2 in unit.scratch:
            name = unit.inputs[0]
            if (name in model.producer and rules.last_use[name] == j and unit.output_shape
                    == model.units[model.producer[name]].output_shape and rules.last_use[unit.name] > j + 1):
                break
    else:
        pytest.fail("no rows unit whose output has its input's shape")
    comp = ComponentPlan(component="vae_rows", model=rows_profile.model, shape=rows_profile.shape,
                         slices={unit.name: 2}, host=[u.name for u in model.units if u.name in (name, unit.name)])
    predicted = host_bytes(model, frozenset(comp.host), segments_of(model, comp))
    assert predicted == model.size[name] + model.size[unit.name] == verify(comp, meta_vae).measured_host_bytes
