"""Fleet capacity ILP: cost of the mixed, packed fleet vs one GPU type for everything; solve time at 20 x 18.

    .venv/bin/python bench/bench_fleet.py
    .venv/bin/python bench/bench_fleet.py --baseline 281722b   # planning time, that commit vs today, side by side,
                                                                # and every plan both made compared

The mix: 20 workloads over the shipped models and shapes (SVD, SVD-XT, AnimateDiff at 576x1024 and
512x512, 20-50 steps), rates from 1 to 60 videos/hour, some with latency bounds. Baselines:
"one type, whole GPUs" gives every workload its own GPUs of the cheapest single type that serves
all of them (no packing); "one type, packed" lets the ILP pack but on that one type only.
Prices are the defaults of planner/capacity.py (assumptions). Latencies are uncalibrated predictions.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from vramplan.planner.capacity import parse_inventory, parse_workloads, plan_fleet, plan_options

sys.path.insert(0, str(Path(__file__).parent))
from report import machine, table, write_section  # noqa: E402

MIX = [  # name, model, height, width, steps, rate (videos/h), p95 latency bound (s)
    ("svd-hd-chat", "svd", 576, 1024, 25, 60, 120),
    ("svd-hd-batch", "svd", 576, 1024, 25, 30, None),
    ("svd-hd-hq", "svd", 576, 1024, 50, 6, None),
    ("svd-hd-fast", "svd", 576, 1024, 20, 20, 60),
    ("svd-sq-chat", "svd", 512, 512, 25, 40, 60),
    ("svd-sq-batch", "svd", 512, 512, 25, 12, None),
    ("svd-sq-preview", "svd", 512, 512, 20, 8, 30),
    ("xt-hd-chat", "svd-xt", 576, 1024, 25, 20, 240),
    ("xt-hd-batch", "svd-xt", 576, 1024, 25, 10, None),
    ("xt-hd-hq", "svd-xt", 576, 1024, 50, 2, None),
    ("xt-sq-chat", "svd-xt", 512, 512, 25, 15, 120),
    ("xt-sq-batch", "svd-xt", 512, 512, 25, 5, None),
    ("ad-hd-chat", "animatediff", 576, 1024, 25, 10, 120),
    ("ad-hd-batch", "animatediff", 576, 1024, 25, 4, None),
    ("ad-sq-chat", "animatediff", 512, 512, 25, 30, 60),
    ("ad-sq-batch", "animatediff", 512, 512, 25, 6, None),
    ("ad-sq-hq", "animatediff", 512, 512, 50, 2, None),
    ("ad-sq-fast", "animatediff", 512, 512, 20, 3, 30),
    ("svd-sq-trickle", "svd", 512, 512, 30, 1, None),
    ("ad-hd-trickle", "animatediff", 576, 1024, 30, 1, None),
]


def snapshot(commit: str) -> str:
    """A copy of ``commit``'s package importable with PYTHONPATH (git archive; nothing in the work tree
    changes): ``<tmp>/vramplan`` with its planner, runtime and profiles in place."""
    import subprocess
    import tempfile

    root = Path(tempfile.mkdtemp(prefix=f"vramplan-{commit[:10]}-"))
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    pkg = root / "pkg"
    pkg.mkdir()
    (pkg / "vramplan").symlink_to(root / "vramplan", target_is_directory=True)
    for part in ("planner", "runtime", "profiles"):
        if not (root / "vramplan" / part).exists():
            (root / "vramplan" / part).symlink_to(root / part, target_is_directory=True)
    return str(pkg)


def timed_fleet(gpus: list[str] | None = None) -> dict:
    """Plan the 20 x 18 mix (or 20 x ``gpus``) once in this process's vramplan; seconds (wall, CPU, planning)."""
    import vramplan.planner.capacity as capacity

    workloads = parse_workloads([
        dict(name=n, model=m, height=h, width=w, steps=s, rate=float(r), p95_latency_s=None if b is None else float(b))
        for n, m, h, w, s, r, b in MIX
    ])
    t0, cpu = time.perf_counter(), _cpu()
    offers = [o for o in parse_inventory(None) if gpus is None or o.gpu in gpus]
    fleet = plan_fleet(workloads, offers)
    plans = {}  # every (workload shape, GPU, bound) plan made: (peak, latency) or the error's first words
    for key, plan in capacity._PLANS.items():
        key = (*key[:8], key[-1]) if len(key) == 10 else key  # keys gained the host RAM after 281722b
        name = json.dumps([None if isinstance(k, float) and k != k else k for k in key])
        pred = getattr(plan, "prediction", None)
        plans[name] = [pred.peak_bytes, pred.latency_s] if pred is not None else str(plan)[:60]
    return {"code": capacity.__file__, "seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(_cpu() - cpu, 1),
            "planning_seconds": round(fleet.solver.planning_seconds, 1), "cost_per_hour": round(fleet.cost_per_hour, 2),
            "gpus": [f"{a.count} x {a.gpu}" for a in fleet.gpus], "plans": plans}


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the worker processes, CBC)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def side_by_side(baseline: str, now: str | None = None, gpus: str | None = None) -> None:
    """``baseline`` (a commit, or a folder to put on PYTHONPATH) and today's code (the work tree, or the
    folder ``now``), each in a fresh process, one after the other; then every plan both made, compared."""
    import os
    import subprocess

    rows, results = [], []
    before = baseline if Path(baseline).is_dir() else snapshot(baseline)
    for label, path in ((f"before ({baseline})", before), (f"now ({now or 'work tree'})", now)):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
        if path:
            env["PYTHONPATH"] = path
        done = subprocess.run([sys.executable, __file__, "--time-only", *(["--gpus", gpus] if gpus else [])], env=env,
                              capture_output=True, text=True, check=True, cwd="/")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        rows.append([label, result["seconds"], result.get("cpu_seconds", "-"), result["planning_seconds"],
                     result["cost_per_hour"], ", ".join(result["gpus"])])
        print(rows[-1], flush=True)
    print(table(["code", "fleet s", "CPU s", "plan_for s", "$/hour", "fleet"], rows))
    old, new = results[0]["plans"], results[1]["plans"]
    both = sorted(set(old) & set(new))
    same = [k for k in both if old[k] == new[k]]
    print(f"plans made by both: {len(both)} (only before: {len(set(old) - set(new))}, only now: "
          f"{len(set(new) - set(old))}); identical (peak, latency): {len(same)}")
    for k in both:
        if old[k] != new[k]:
            better = (isinstance(old[k], list) and isinstance(new[k], list) and new[k][0] <= old[k][0]
                      and new[k][1] <= old[k][1])
            print(f"  {'better' if better else 'DIFFERENT'}: {k}: {old[k]} -> {new[k]}")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", metavar="COMMIT", help="time this commit's fleet planning (or a folder's "
                        "on PYTHONPATH), then today's, and compare their plans")
    parser.add_argument("--now", metavar="DIR", help="with --baseline: a folder on PYTHONPATH instead of the work tree")
    parser.add_argument("--time-only", action="store_true", help="print one timing as JSON (for --baseline)")
    parser.add_argument("--gpus", metavar="A,B", help="with --baseline: only these GPU types (default: all 18)")
    args = parser.parse_args()
    if args.time_only:
        print(json.dumps(timed_fleet(args.gpus.split(",") if args.gpus else None)))
        return
    if args.baseline:
        side_by_side(args.baseline, args.now, args.gpus)
        return
    workloads = parse_workloads([
        dict(name=n, model=m, height=h, width=w, steps=s, rate=float(r), p95_latency_s=None if b is None else float(b))
        for n, m, h, w, s, r, b in MIX
    ])
    offers = parse_inventory(None)
    t0 = time.perf_counter()
    fleet = plan_fleet(workloads, offers)
    total = time.perf_counter() - t0
    head = (f"{len(workloads)} workloads x {len(offers)} GPU types, at most {fleet.solver.max_jobs} jobs per GPU, "
            f"gap {fleet.solver.gap:.0%}: plans {fleet.solver.planning_seconds:.1f} s (plan_for per workload x GPU, "
            f"in worker processes), patterns + ILP {fleet.solver.solve_seconds:.2f} s ({fleet.solver.patterns} "
            f"patterns, {fleet.solver.status}); end to end {total:.1f} s")
    print(head)
    unserved = ", ".join(u.workload for u in fleet.unserved) or "none"
    served = [w for w in workloads if w.name not in {u.workload for u in fleet.unserved}]

    rows = [["ILP: mixed types, packed", f"{fleet.cost_per_hour:.2f}", sum(a.count for a in fleet.gpus),
             ", ".join(f"{a.count} x {a.gpu}" for a in fleet.gpus)]]
    options, _ = plan_options(served, offers)  # cached plans
    single = []
    for offer in offers:
        if not all((i, offer.gpu) in options for i in range(len(served))):
            continue  # this type cannot serve every workload
        whole = sum(math.ceil(w.rate * options[(i, offer.gpu)].latency_s / 3600 - 1e-9) for i, w in enumerate(served))
        single.append((whole * offer.price_per_hour, whole, offer))
    cost, n, offer = min(single, key=lambda t: t[0])
    rows.append([f"one type, whole GPUs ({offer.gpu})", f"{cost:.2f}", n, f"{n} x {offer.gpu}"])
    packed = min((plan_fleet(served, [o]) for _, _, o in single), key=lambda f: f.cost_per_hour)
    rows.append([f"one type, packed ({packed.gpus[0].gpu})", f"{packed.cost_per_hour:.2f}", packed.gpus[0].count,
                 f"{packed.gpus[0].count} x {packed.gpus[0].gpu}"])
    saving = (f"The ILP's fleet costs {100 * (1 - fleet.cost_per_hour / cost):.0f} % less than the cheapest single "
              f"type with whole GPUs per workload, {100 * (1 - fleet.cost_per_hour / packed.cost_per_hour):.0f} % "
              f"less than the cheapest single type packed.")
    text = table(["fleet", "$/hour", "GPUs", "composition"], rows)
    print(text)
    print(saving)
    mix = table(["workload", "model", "shape", "steps", "videos/h", "p95 s"],
                [[n, m, f"{h}x{w}", s, r, "-" if b is None else b] for n, m, h, w, s, r, b in MIX])
    write_section("fleet", f"""## Fleet capacity ILP: mixed fleet vs one GPU type (`bench/bench_fleet.py`)

{machine()} (a shared machine: other jobs ran at the same time). Prices: the defaults in
`planner/capacity.py` (assumptions, not quotes); latencies: the uncalibrated model. Unserved: {unserved}.

{head}.

{text}

{saving} "One type, whole GPUs": every workload gets `ceil(rate x latency / 3600)` GPUs of one type (the
cheapest type that serves all 20). "One type, packed": the same ILP restricted to one type.

<details><summary>the mix</summary>

{mix}

</details>
""")


if __name__ == "__main__":
    main()
