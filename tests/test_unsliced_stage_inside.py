"""An unsliced unit that stages its input itself (``stage_inside``: the Wan VAE decode's up levels, run by
the rows executor at k=1 too) copies one frame at a time, a copy in its profiled scratch: with its input in
host memory it holds no whole staged input (planner/costs.py, the unsliced branch of ``_memory``; the
sliced rows groups: rows_cost, 12cee0e). Predicted against the executor's peak on meta (tiny Wan 2.1 VAE)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_wan_vae
from vramplan.planner.costs import CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.plan import component_costs
from vramplan.planner.schema import ComponentPlan, SampleShape
from vramplan.runtime import apply_plan
from vramplan.runtime.memory import MemoryTracker
from vramplan.runtime.models import meta_from_config
from vramplan.runtime.profiler import profile

from vramplan import Plan


def test_an_unsliced_level_with_its_input_on_host_is_predicted():
    vae = tiny_wan_vae(0, wan22=False)
    shape = SampleShape(batch=1, frames=3, latent_height=12, latent_width=10, dtype="fp32")
    meta = meta_from_config({**vae.config, "_class_name": type(vae).__name__}, "fp32")
    prof = profile(meta, shape, "cpu_flash", name="tiny", max_k=2)
    ks = (2, 2, 2, 1)  # the last level (the largest) unsliced, its input on host
    ups = [u.name for u in prof.units if u.name.startswith("decoder.up_blocks")]
    assert all(u.stage_inside for u in prof.units if u.name in ups)
    slices = {n: k for n, k in zip(ups, ks, strict=False) if k > 1}
    host = ["decoder.mid_block", *ups[:-1]]  # every value between levels
    comp = ComponentPlan(component="vae", model=prof.model, shape=prof.shape, slices=slices, host=host)
    costs = component_costs(CostModel(prof, find_gpu("RTX 4090")), comp)
    predicted = max(c.activation_bytes for _, c in costs)
    z = torch.empty(1, meta.config.z_dim, shape.frames, shape.latent_height, shape.latent_width, device="meta")
    with apply_plan(meta, Plan(components=[comp])), MemoryTracker() as tracker, torch.no_grad():
        meta.decode(z)
    assert predicted == pytest.approx(tracker.peak_bytes, rel=0.005)
