"""Fleet capacity ILP: optimal against a brute force, packing within memory and latency, bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from vramplan.planner.capacity import (
    FleetPlan,
    FleetPlanError,
    GpuOffer,
    InventoryError,
    Option,
    WorkloadError,
    brute_force_cost,
    enumerate_patterns,
    parse_inventory,
    parse_workloads,
    plan_fleet,
    read_document,
    solve_patterns,
)

GIB = 2**30


def _options(table):
    """{(workload, gpu): (peak GiB, latency s, bound s)} -> Options on 10 GiB GPUs."""
    return {(w, g): Option(w, g, int(peak * GIB), 10 * GIB, lat, bound) for (w, g), (peak, lat, bound) in table.items()}


def _cost(chosen, offers):
    price = {o.gpu: o.price_per_hour for o in offers}
    return sum(price[p.gpu] * n for p, n in chosen.items())


@pytest.mark.parametrize("seed", range(12))
def test_ilp_matches_brute_force(seed):
    rng = random.Random(seed)
    gpus = ["small", "big"]
    offers = [GpuOffer(gpu="small", count=rng.choice([None, 2]), price_per_hour=1.0),
              GpuOffer(gpu="big", count=None, price_per_hour=rng.uniform(1.2, 3.0))]
    table = {}
    for w in range(3):
        bound = rng.choice([float("inf"), 200.0])
        for g in gpus:
            if rng.random() < 0.85:
                fast = 0.5 if g == "big" else 1.0
                table[(w, g)] = (rng.uniform(1.5, 6.0), rng.uniform(30, 120) * fast, bound)
    options = _options(table)
    served = {w for (w, _) in table}
    rates = {w: rng.uniform(5, 60) for w in served}
    patterns = enumerate_patterns(options, gpus, max_jobs=3)
    brute = brute_force_cost(options, rates, offers, max_jobs=3, max_gpus=4)
    try:
        chosen, _ = solve_patterns(patterns, rates, offers)
    except InventoryError:
        assert brute is None
        return
    if brute is None:  # every solution needs more than the brute force's 4 GPUs
        assert sum(chosen.values()) > 4
    else:
        assert _cost(chosen, offers) == pytest.approx(brute, abs=1e-6)


def test_small_rates_share_a_gpu_within_memory():
    offers = [GpuOffer(gpu="g", count=None, price_per_hour=1.0)]
    rates = {0: 10.0, 1: 10.0}  # each needs a sixth of a GPU at 60 s per video
    fit = _options({(0, "g"): (4.0, 60.0, float("inf")), (1, "g"): (4.0, 60.0, float("inf"))})
    chosen, _ = solve_patterns(enumerate_patterns(fit, ["g"], 3), rates, offers)
    assert sum(chosen.values()) == 1 and [p.slots for p in chosen] == [(0, 1)]
    too_big = _options({(0, "g"): (6.0, 60.0, float("inf")), (1, "g"): (6.0, 60.0, float("inf"))})
    chosen, _ = solve_patterns(enumerate_patterns(too_big, ["g"], 3), rates, offers)
    assert sum(chosen.values()) == 2 and all(len(p.slots) == 1 for p in chosen)


def test_time_sharing_latency_blocks_packing():
    # packed, each job takes 60 + 60 s: beyond workload 0's 100 s bound, so no shared GPU
    opts = _options({(0, "g"): (2.0, 60.0, 100.0), (1, "g"): (2.0, 60.0, float("inf"))})
    patterns = enumerate_patterns(opts, ["g"], 3)
    assert sorted(p.slots for p in patterns) == [(0,), (1,)]
    opts = _options({(0, "g"): (2.0, 60.0, 130.0), (1, "g"): (2.0, 60.0, float("inf"))})
    packed = [p for p in enumerate_patterns(opts, ["g"], 3) if len(p.slots) > 1]
    assert {p.slots for p in packed} == {(0, 1)}  # three jobs would take 180 s > 130 s
    assert all(p.cycle_s == pytest.approx(60.0 * len(p.slots)) for p in packed)


def test_packed_jobs_share_the_machines_pinned_host_memory():
    """Two jobs fit the GPU's memory together, but their plans' pinned host memory does not fit one machine:
    the pattern is not admissible (and the brute force agrees), so each runs on its own GPU."""
    def opts(host_gib, limit_gib):
        return {(w, "g"): Option(w, "g", 4 * GIB, 10 * GIB, 60.0, float("inf"), None, int(host_gib * GIB),
                                 int(limit_gib * GIB)) for w in (0, 1)}

    offers = [GpuOffer(gpu="g", count=None, price_per_hour=1.0)]
    rates = {0: 10.0, 1: 10.0}
    fits, over = opts(10, 24), opts(14, 24)
    assert {p.slots for p in enumerate_patterns(fits, ["g"], 3)} == {(0,), (1,), (0, 1)}
    assert {p.slots for p in enumerate_patterns(over, ["g"], 3)} == {(0,), (1,)}
    chosen, _ = solve_patterns(enumerate_patterns(over, ["g"], 3), rates, offers)
    assert sum(chosen.values()) == 2
    assert brute_force_cost(over, rates, offers, max_jobs=3, max_gpus=3) == pytest.approx(2.0)
    assert brute_force_cost(fits, rates, offers, max_jobs=3, max_gpus=3) == pytest.approx(1.0)


def test_inventory_host_ram_reaches_the_plans():
    offers = parse_inventory([{"gpu": "4090", "count": 1, "price_per_hour": 1.0, "host_ram_gb": 48}])
    assert offers[0].host_ram_gb == 48
    with pytest.raises(InventoryError, match="host_ram_gb"):
        parse_inventory([{"gpu": "4090", "host_ram_gb": -1}])
    fleet = plan_fleet(parse_workloads([{"name": "sq", "model": "svd", "height": 512, "width": 512, "rate": 2.0}]),
                       offers)
    job = fleet.gpus[0].packings[0].jobs[0]
    assert (job.plan.target.host_ram_bytes, job.plan.target.host_ram_source) == (48 * GIB, "given")
    assert not any("assumed per machine" in note for note in fleet.assumptions)
    assumed = plan_fleet(parse_workloads([{"name": "sq", "model": "svd", "height": 512, "width": 512, "rate": 2.0}]),
                         parse_inventory([{"gpu": "4090", "count": 1, "price_per_hour": 1.0}]))
    assert any("24 GiB of pinned host memory assumed per machine" in note for note in assumed.assumptions)


WORKLOADS = [
    {"name": "hd", "model": "svd", "height": 576, "width": 1024, "rate": 3.0},
    {"name": "sq", "model": "svd", "height": 512, "width": 512, "rate": 2.0},
]


def test_plan_fleet_real_plans_round_trip(tmp_path):
    workloads = parse_workloads(WORKLOADS)
    offers = parse_inventory([{"gpu": "A10G", "count": 4, "price_per_hour": 1.0}, {"gpu": "4090", "count": 2}])
    fleet = plan_fleet(workloads, offers)
    assert fleet.cost_per_hour > 0 and not fleet.unserved
    for w in workloads:
        assert fleet.capacity(w.name) >= w.rate
    for alloc in fleet.gpus:
        for packing in alloc.packings:
            assert sum(j.plan.prediction.peak_bytes for j in packing.jobs) <= alloc.usable_bytes
            assert all(j.plan.target.gpu == alloc.gpu for j in packing.jobs)
    # two low-rate workloads: one GPU serving both beats a GPU each
    assert sum(a.count for a in fleet.gpus) == 1
    path = fleet.save(tmp_path / "fleet.json")
    again = FleetPlan.load(path)
    assert again == fleet
    assert "properties" in FleetPlan.model_json_schema()


def test_latency_bound_no_gpu_meets_is_reported():
    workloads = parse_workloads([*WORKLOADS, {"name": "instant", "model": "svd", "rate": 1.0, "p95_latency_s": 1.0}])
    fleet = plan_fleet(workloads, parse_inventory([{"gpu": "A10G"}]))
    assert [u.workload for u in fleet.unserved] == ["instant"]
    assert "p95_latency_s=1" in fleet.unserved[0].reason and "A10G" in fleet.unserved[0].reason
    assert fleet.capacity("hd") >= 3.0


def test_inventory_shortfall_names_the_workload():
    workloads = parse_workloads([{"name": "busy", "model": "svd", "rate": 500.0}])
    with pytest.raises(InventoryError, match=r"'busy' is short by [0-9.]+ of 500 videos/hour"):
        plan_fleet(workloads, parse_inventory([{"gpu": "A10G", "count": 2}]))


@pytest.mark.parametrize("entry, message", [
    ({"name": "x", "model": "sora", "rate": 1.0}, "unknown model 'sora'"),
    ({"name": "x", "model": "svd", "rate": -3.0}, "'rate': Input should be greater than 0"),
    ({"name": "x", "model": "svd", "rate": "forty"}, "'rate': Input should be a valid number"),
    ({"name": "x", "model": "svd", "rate": float("nan")}, "'rate'"),
    ({"name": "x", "model": "svd", "rate": 1.0, "steps": 0}, "'steps'"),
    ({"name": "x", "model": "svd", "rate": 1.0, "bogus": 1}, "'bogus': Extra inputs"),
])
def test_bad_workloads(entry, message):
    with pytest.raises(WorkloadError, match=message):
        parse_workloads([entry])


def test_impossible_shape_names_the_workload():
    workloads = parse_workloads([{"name": "odd", "model": "svd", "height": 100, "width": 1024, "rate": 1.0}])
    with pytest.raises(WorkloadError, match=r"workload 'odd': height=100 is not a multiple of 8"):
        plan_fleet(workloads, parse_inventory([{"gpu": "A10G"}]))


def test_bad_inventory_and_files(tmp_path):
    with pytest.raises(InventoryError, match="'count'"):
        parse_inventory([{"gpu": "A10G", "count": -1}])
    with pytest.raises(InventoryError, match="listed twice"):
        parse_inventory([{"gpu": "A10G"}, {"gpu": "a10g"}])
    with pytest.raises(WorkloadError, match="repeated: a"):
        parse_workloads([{"name": "a", "model": "svd", "rate": 1.0}] * 2)
    yaml_file = tmp_path / "w.yaml"
    yaml_file.write_text("workloads:\n  - name: a\n    model: svd\n    rate: 2\n")
    assert parse_workloads(read_document(yaml_file))[0].rate == 2.0
    json_file = tmp_path / "w.json"
    json_file.write_text("{not json")
    with pytest.raises(Exception, match="not valid JSON"):
        read_document(json_file)


def test_hand_edited_fleet_plan_packed_beyond_memory(tmp_path):
    fleet = plan_fleet(parse_workloads(WORKLOADS), parse_inventory([{"gpu": "A10G", "count": 4}]))
    data = json.loads(fleet.model_dump_json())
    packing = data["gpus"][0]["packings"][0]
    while len(packing["jobs"]) < 24:  # the same job again and again on one GPU
        packing["jobs"].append(dict(packing["jobs"][0], num_gpus=0.01))
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FleetPlanError, match=r"A10G packs .*peaks sum to .* beyond"):
        FleetPlan.load(path)
    path.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(FleetPlanError, match="not a vramplan fleet plan"):
        FleetPlan.load(path)


def test_fleet_planning_needs_neither_torch_nor_ray():
    code = ("import sys; from vramplan.planner.capacity import plan_fleet, parse_workloads, parse_inventory; "
            "f = plan_fleet(parse_workloads([{'name': 'a', 'model': 'svd', 'rate': 2.0}]), "
            "parse_inventory([{'gpu': 'L4'}])); "
            "print(f.cost_per_hour, sorted(m for m in ('torch', 'ray', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split(" ", 1)[1].strip() == "[]"
