"""A stage's alternative plans in the shipped profiles: the decode along frames (`vae`) or rows (`vae_rows`).

For SVD 14f, SVD-XT 25f and AnimateDiff 16f at 576x1024 (fp16, efficient attention: the 2080 Ti's
profiles), the shipped profile is planned as shipped (the planner takes per stage the fastest feasible
alternative) and with its alternatives removed (the frames decode only, as before), on the 2080 Ti
profile with 24 GiB assumed host memory (as ``vramplan plan --gpu 2080Ti``): at a few budgets, whether
the plans are identical and which decode the planner took; the exact floors (the smallest budget in
0.01 GiB steps that plans) of both, and the latency of the floor plan.

    python bench/bench_stage_alternatives.py [--models svd svd-xt animatediff] [--write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from report import machine, table, write_section  # noqa: E402
from vramplan.planner.errors import InfeasibleError  # noqa: E402
from vramplan.planner.gpus import find_gpu  # noqa: E402
from vramplan.planner.pipeline import plan_pipeline  # noqa: E402
from vramplan.planner.plan import shipped_pipeline_profile  # noqa: E402

GIB = 2**30
HOST = 24 * GIB
BUDGETS = (None, 6.0, 4.0, 2.0, 1.5, 1.4, 1.2, 1.0)


def plan(prof, gb):
    try:
        return plan_pipeline(prof, find_gpu("2080Ti"), usable_bytes=None if gb is None else int(gb * GIB),
                             host_ram_bytes=HOST, host_ram_source="assumed")
    except InfeasibleError:
        return None


def floor(prof, lo: int = 50, hi: int = 250):
    """The smallest budget (hundredths of a GiB) that plans, and its plan."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if plan(prof, mid / 100) is not None else (mid, hi)
    return hi / 100, plan(prof, hi / 100)


def decode_of(p) -> str:
    return next(s.component for s in p.stages if s.stage == "decode")


def main(argv=None) -> None:
    from vramplan.profiles import model_catalogue

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["svd", "svd-xt", "animatediff"])
    ap.add_argument("--write", action="store_true", help="record the tables in docs/benchmarks.md")
    args = ap.parse_args(argv)
    same_rows, floor_rows = [], []
    for model in args.models:
        frames = model_catalogue()[model]["frames"]
        both = shipped_pipeline_profile(model, 576, 1024, frames, True, "fp16", "efficient")
        only = both.model_copy(update={"alternatives": []})
        for gb in BUDGETS:
            started = time.perf_counter()
            a, b = plan(only, gb), plan(both, gb)
            same = (a is not None and b is not None
                    and a.model_dump(exclude={"solver"}) == b.model_dump(exclude={"solver"}))
            same_rows.append([f"{model} {frames}f", "card" if gb is None else f"{gb:g} GiB",
                              "-" if a is None else f"{a.prediction.latency_s:.1f}",
                              "refused" if b is None else f"{b.prediction.latency_s:.1f}",
                              "-" if b is None else decode_of(b), "yes" if same else "no",
                              f"{time.perf_counter() - started:.1f}"])
            print(same_rows[-1], flush=True)
        (f0, p0), (f1, p1) = floor(only), floor(both)
        floor_rows.append([f"{model} {frames}f", f"{f0:.2f}", f"{p0.prediction.latency_s:.1f}", f"{f1:.2f}",
                           decode_of(p1), f"{p1.prediction.latency_s:.1f}"])
        print(floor_rows[-1], flush=True)
    t1 = table(["model", "budget", "latency s, frames only", "latency s, as shipped", "decode taken",
                "plan identical", "CPU s (both)"], same_rows)
    t2 = table(["model", "floor GiB, frames only", "its latency s", "floor GiB, as shipped", "decode taken",
                "its latency s"], floor_rows)
    print(t1)
    print()
    print(t2)
    if args.write:
        body = (
            "### A stage's alternative plans: the decode along frames or rows\n\n"
            f"`python bench/bench_stage_alternatives.py --write` ({machine()}): the shipped 576x1024 fp16 profiles "
            "(efficient attention) planned as shipped (the decode profiled under `vae` and, as an alternative, "
            "`vae_rows`: the planner takes the fastest feasible) and with the alternative removed (frames only, as "
            "before), on the RTX 2080 Ti profile with 24 GiB assumed host memory (as `vramplan plan --gpu 2080Ti`). "
            "Predicted latency (25 steps), the decode the planner took, and whether the whole plan is identical "
            "(every field but the solver's own seconds):\n\n" + t1 + "\n\n"
            "Exact floors (the smallest `--vram-gb` in 0.01 steps that plans) and the latency of the plan there:\n\n"
            + t2 + "\n")
        write_section("stage_alternatives", body)


if __name__ == "__main__":
    main()
