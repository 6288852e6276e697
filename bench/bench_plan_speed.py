"""Planning speed of ``plan_for`` on the shipped SVD / SVD-XT / AnimateDiff profiles and a Wan 14B profile
(issue 18, part 3; issue 15).

Every SVD / SVD-XT / AnimateDiff profile on its kernel's GPUs (efficient: RTX 2080 Ti; flash: RTX 4090 and
RTX 3050 Laptop): the fastest plan, then ``max_latency_s`` at 1.2x and 1.02x its latency, in one process (as
a user's ``plan`` after ``plan``), each timed (CPU seconds of this process, and wall); then Wan 2.1 T2V-14B
at 720x1280x81 on the RTX 4060 Laptop (bf16, the shipped profile, no torch). Prints one row per plan and
the slowest of each kind. Targets: every plan under 2 s, the Wan plan under 1 s.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_plan_speed.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_plan_speed.py --baseline 281722b   # that commit, then today's,
                                                                                     # side by side, plans compared
    (``--now <folder>``: a second frozen copy instead of the work tree; ``--rows``: every plan's CPU s side by side)
"""

from __future__ import annotations

import json
import sys
import time

GPUS = {"efficient": ["RTX 2080 Ti"], "flash": ["RTX 4090", "RTX 3050 Laptop"]}
WAN = dict(gpu="RTX 4060 Laptop", model="wan2.1-t2v-14b", height=720, width=1280, frames=81, dtype="bf16",
           host_ram_gb=64.0)  # the plan needs ~28 GiB of pinned host memory: more than the 24 GiB assumed


def timed(**kwargs):
    from vramplan import plan_for

    cpu, wall = time.process_time(), time.perf_counter()
    plan = plan_for(**kwargs)
    return plan, time.process_time() - cpu, time.perf_counter() - wall


def measure() -> list[dict]:
    """Every plan of the module docstring: what, kind, CPU s, wall s, peak bytes, latency s."""
    from vramplan.planner.plan import shipped_profiles

    rows = []
    for name in shipped_profiles():
        stem = name.removesuffix(".pipeline.json")
        if stem.startswith("wan"):
            continue
        size = next(p for p in stem.split("-") if "x" in p and p[0].isdigit())
        model = stem[: stem.index(f"-{size}")]
        frames = int(stem.split("-f")[1].split("-")[0])
        kernel = stem.rsplit("-", 1)[1]
        h, w = (int(x) for x in size.split("x"))
        for gpu in GPUS[kernel]:
            shape = dict(gpu=gpu, model=model, height=h, width=w, frames=frames)
            fastest, cpu, wall = timed(**shape)
            runs = [("fastest", fastest, cpu, wall, None)]
            for factor in (1.2, 1.02):
                limit = fastest.prediction.latency_s * factor
                runs.append((f"{factor}x", *timed(**shape, max_latency_s=limit), limit))
            for label, plan, cpu, wall, limit in runs:
                rows.append(dict(what=f"{model} {h}x{w} {gpu}", kind=label, cpu=cpu, wall=wall,
                                 peak=plan.prediction.peak_bytes, latency=plan.prediction.latency_s, limit=limit))
                print(f"{rows[-1]['what'] + ' ' + label:48s} cpu {cpu:6.2f} s  wall {wall:6.2f} s  "
                      f"peak {plan.prediction.peak_bytes / 2**30:.3f} GiB  latency {plan.prediction.latency_s:.3f} s",
                      file=sys.stderr, flush=True)
    plan, cpu, wall = timed(**WAN)
    rows.append(dict(what="wan2.1-t2v-14b 720x1280 RTX 4060 Laptop", kind="wan 14B", cpu=cpu, wall=wall,
                     peak=plan.prediction.peak_bytes, latency=plan.prediction.latency_s))
    return rows


def slowest(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        if r["cpu"] > out.get(r["kind"], {"cpu": -1.0})["cpu"]:
            out[r["kind"]] = r
    return out


def side_by_side(baseline: str, now: str | None = None) -> None:
    """``baseline`` (a commit, or a folder to put on PYTHONPATH) and today's code (the work tree, or the folder
    ``now``), each in a fresh process, one after the other; the slowest plans and every plan compared."""
    import os
    import subprocess
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_fleet import snapshot

    path = baseline if Path(baseline).is_dir() else snapshot(baseline)
    results = []
    for label, pythonpath in ((f"before ({baseline})", path), (f"now ({now or 'work tree'})", now)):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        done = subprocess.run([sys.executable, __file__, "--json"], env=env, capture_output=True, text=True,
                              check=True, cwd="/")
        results.append((label, json.loads(done.stdout.strip().splitlines()[-1])))
    (old_label, old), (new_label, new) = results
    print(f"{'slowest':10s} {old_label:>28s} {new_label:>28s}   (CPU s / wall s)")
    a, b = slowest(old), slowest(new)
    for kind in a:
        print(f"{kind:10s} {a[kind]['cpu']:12.2f} / {a[kind]['wall']:6.2f} s {b[kind]['cpu']:16.2f} / "
              f"{b[kind]['wall']:6.2f} s   ({a[kind]['what']} | {b[kind]['what']})")
    print(f"CPU s in all: {sum(r['cpu'] for r in old):.1f} -> {sum(r['cpu'] for r in new):.1f}")
    for limit in (2.0, 1.0):
        print(f"plans over {limit:g} CPU s: {sum(r['cpu'] > limit for r in old)} -> {sum(r['cpu'] > limit for r in new)} "
              f"of {len(new)}")
    if "--rows" in sys.argv:
        for x, y in zip(old, new, strict=True):
            same = "same plan" if (x["peak"], x["latency"]) == (y["peak"], y["latency"]) else "plan differs"
            print(f"  {x['what'] + ' ' + x['kind']:48s} {x['cpu']:6.2f} -> {y['cpu']:6.2f} CPU s  {same}")
    same = sum((x["peak"], x["latency"]) == (y["peak"], y["latency"]) for x, y in zip(old, new, strict=True))
    print(f"plans with the same (peak, latency): {same} of {len(old)}")
    for x, y in zip(old, new, strict=True):
        if (x["peak"], x["latency"]) != (y["peak"], y["latency"]):
            print(f"  {'better' if better(x, y) else 'WORSE'}: {x['what']} {x['kind']}: "
                  f"{x['peak']} B / {x['latency']} s -> {y['peak']} B / {y['latency']} s")


def better(x: dict, y: dict) -> bool:
    """Whether plan ``y`` is at least as good as ``x`` under the request's own objective: the fastest (then the
    smaller peak), or under a latency limit the smaller peak (then the faster) within the limit."""
    if x.get("limit") is None:
        return (y["latency"], y["peak"]) <= (x["latency"], x["peak"])
    return y["latency"] <= x["limit"] and (y["peak"], y["latency"]) <= (x["peak"], x["latency"])


def main() -> None:
    if "--json" in sys.argv:
        print(json.dumps(measure()))
        return
    if "--baseline" in sys.argv:
        now = sys.argv[sys.argv.index("--now") + 1] if "--now" in sys.argv else None
        side_by_side(sys.argv[sys.argv.index("--baseline") + 1], now)
        return
    for kind, r in slowest(measure()).items():
        print(f"slowest {kind}: {r['what']}: cpu {r['cpu']:.2f} s, wall {r['wall']:.2f} s")


if __name__ == "__main__":
    main()
