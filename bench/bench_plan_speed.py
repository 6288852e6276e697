"""Planning speed of ``plan_for`` on the shipped SVD / SVD-XT / AnimateDiff profiles (issue 18, part 3).

Every such profile on its kernel's GPUs (efficient: RTX 2080 Ti; flash: RTX 4090 and RTX 3050 Laptop):
the fastest plan, then ``max_latency_s`` at 1.2x and 1.02x its latency, in one process (as a user's
``plan`` after ``plan``), each timed (CPU seconds of this process, and wall). Prints one row per
plan and the slowest of each kind. Target: every plan under 2 s.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_plan_speed.py
"""

from __future__ import annotations

import time

from vramplan.planner.plan import shipped_profiles

from vramplan import plan_for

GPUS = {"efficient": ["RTX 2080 Ti"], "flash": ["RTX 4090", "RTX 3050 Laptop"]}


def timed(**kwargs):
    cpu, wall = time.process_time(), time.perf_counter()
    plan = plan_for(**kwargs)
    return plan, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    slowest: dict[str, tuple[float, float, str]] = {}
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
            runs = [("fastest", fastest, cpu, wall)]
            for factor in (1.2, 1.02):
                runs.append((f"{factor}x", *timed(**shape, max_latency_s=fastest.prediction.latency_s * factor)))
            for label, plan, cpu, wall in runs:
                what = f"{model} {h}x{w} {gpu} {label}"
                print(f"{what:48s} cpu {cpu:6.2f} s  wall {wall:6.2f} s  peak {plan.prediction.peak_bytes / 2**30:.3f} GiB"
                      f"  latency {plan.prediction.latency_s:.3f} s", flush=True)
                if cpu > slowest.get(label, (0.0,))[0]:
                    slowest[label] = (cpu, wall, what)
    for label, (cpu, wall, what) in slowest.items():
        print(f"slowest {label}: {what}: cpu {cpu:.2f} s, wall {wall:.2f} s")


if __name__ == "__main__":
    main()
