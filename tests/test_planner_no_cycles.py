"""An evicted cost model is freed by reference counting, not left in cycles for a full garbage collection:
every cost model memoises its solutions, its placement walk and its refused searches, and a back-reference
from any of them (a solution's lazy segment costs, the walk, a memoised error's traceback frames) kept the
model and all it memoised alive until a generation-2 collection freed ~1.26 million objects at once, in
whichever later plan triggered it (1.6-1.8 s of one plan in bench/bench_plan_speed.py)."""

from __future__ import annotations

import gc
import weakref

import vramplan.planner.pipeline as pipeline

from vramplan import plan_for


def test_evicted_cost_models_are_freed_without_a_full_collection():
    # a first plan in a process may keep its frames (an exception stored by a one-time import check holds
    # the stack it was raised in, back to the plan's frames): plan something else first
    plan_for(gpu="RTX 4090", model="animatediff", height=512, width=512, frames=16)
    pipeline._MODELS.clear()
    call = dict(gpu="RTX 2080 Ti", model="svd", height=512, width=512, frames=14)
    fastest = plan_for(**call)  # refused searches are memoised too: a bisection below
    plan_for(**call, max_latency_s=fastest.prediction.latency_s * 1.2)
    models = [weakref.ref(m) for m in pipeline._MODELS.values()]
    assert models
    enabled = gc.isenabled()
    gc.collect()  # today's garbage gone; the kept models and their memos now in the oldest generation
    gc.disable()
    try:
        pipeline._MODELS.clear()
        gc.collect(1)  # the young generations only: what a cycle among old objects never meets
        alive = [r for r in models if r() is not None]
        assert not alive, f"{len(alive)} of {len(models)} evicted cost models kept alive by reference cycles"
    finally:
        if enabled:
            gc.enable()
