"""A rows group of the Wan VAE decode's up levels: each level crops to the rows its readers need
(``rows_cropped``), so what an earlier level of the group holds for a later one is its slice's own rows,
not its whole slab. Predicted against the executor's peak on meta (tiny Wan 2.1 VAE, uneven slices);
priced as the whole slab it was 2.7-8.3 % over."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_wan_vae
from vramplan.planner.costs import CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.plan import component_costs
from vramplan.planner.schema import ComponentPlan, Group, SampleShape
from vramplan.runtime import apply_plan
from vramplan.runtime.memory import MemoryTracker
from vramplan.runtime.models import meta_from_config
from vramplan.runtime.profiler import profile

from vramplan import Plan

SHAPE = SampleShape(batch=1, frames=3, latent_height=12, latent_width=10, dtype="fp32")


@pytest.fixture(scope="module")
def case():
    vae = tiny_wan_vae(0)
    meta = meta_from_config({**vae.config, "_class_name": type(vae).__name__}, "fp32")
    return meta, profile(meta, SHAPE, "cpu_flash", name="tiny", max_k=4)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("first", [0, 2])  # every up level in one group; the last two
def test_a_group_of_up_levels_is_predicted(case, k, first):
    meta, prof = case
    ups = [u.name for u in prof.units if u.name.startswith("decoder.up_blocks")]
    assert all(u.rows_cropped for u in prof.units if u.name in ups)
    comp = ComponentPlan(component="vae", model=prof.model, shape=prof.shape, slices={n: k for n in ups},
                         groups=[Group(units=ups[first:], axis="rows", k=k)])
    predicted = max(c.activation_bytes for _, c in component_costs(CostModel(prof, find_gpu("RTX 4090")), comp))
    z = torch.empty(1, meta.config.z_dim, SHAPE.frames, SHAPE.latent_height, SHAPE.latent_width, device="meta")
    with apply_plan(meta, Plan(components=[comp])), MemoryTracker() as tracker, torch.no_grad():
        meta.decode(z)
    assert predicted == pytest.approx(tracker.peak_bytes, rel=0.005)
