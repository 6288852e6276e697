"""Wan 2.1 / 2.2 plans from the shipped profiles: the issue's memory targets on an RTX 4090 profile
(peak, latency against an all-resident plan on the same profile: the 4090's rates with memory for every
weight, pinned host memory), and published
end-to-end times next to the prediction for the same card and settings.

    .venv/bin/python bench/bench_wan.py            # tables (torch-free: the planner only)
    .venv/bin/python bench/bench_wan.py --verify   # + run each target plan on meta tensors of the
                                                   #   full-size models and compare (minutes, needs torch)
    .venv/bin/python bench/bench_wan.py --verify --components vae,vae_encoder   # only those components

Prints markdown tables for docs/benchmarks.md. Latency is the cost model's prediction with the
uncalibrated default constants (planner/costs.py) unless the GPU profile has fitted ones.
"""

from __future__ import annotations

import argparse
import platform
import time

from vramplan.planner.errors import InfeasibleError
from vramplan.planner.fmt import human_bytes

from vramplan import plan_for

GiB = 2**30
HOST = 128  # GiB of pinned host memory allowed (the streamed weights of a 14B DiT + UMT5 need ~40)
RESIDENT = 200  # GiB: a budget where nothing is streamed or placed (beyond the card: the planner warns)

# (model, height, width, frames, budget GiB): the targets, then every other shipped Wan shape at
# the 14B target (the issue names none for them)
TARGETS = [
    ("wan2.1-t2v-14b", 720, 1280, 81, 6),
    ("wan2.1-t2v-1.3b", 480, 832, 81, 2),
    ("wan2.2-t2v-a14b", 720, 1280, 81, 6),
    ("wan2.2-i2v-a14b", 720, 1280, 81, 6),
    ("wan2.2-ti2v-5b", 704, 1280, 121, 4),
    ("wan2.1-t2v-14b", 480, 832, 81, 6),
    ("wan2.1-i2v-14b", 480, 832, 81, 6),
    ("wan2.1-i2v-14b", 720, 1280, 81, 6),
]

# Published end-to-end times: (what, model, height, width, frames, steps, gpu, seconds, source)
PUBLISHED = [
    ("Wan 2.1 T2V-1.3B, 480x832x81, 50 steps", "wan2.1-t2v-1.3b", 480, 832, 81, 50, "A800", 175,
     "issue #15, from the Wan 2.1 computational-efficiency table (single GPU)"),
    ("Wan 2.1 T2V-1.3B, 480x832x81, 50 steps, with offload", "wan2.1-t2v-1.3b", 480, 832, 81, 50, "RTX 4090", 240,
     "issue #15: 'about 4 minutes on an RTX 4090' (Wan 2.1 README, offload + t5_cpu)"),
    ("Wan 2.1 T2V-14B, 720x1280x81, 50 steps", "wan2.1-t2v-14b", 720, 1280, 81, 50, "A800", 3600,
     "issue #15: '~60 min on one A800'"),
    ("Wan 2.1 I2V-14B, 720x1280x81, 40 steps", "wan2.1-i2v-14b", 720, 1280, 81, 40, "H200", 974,
     "issue #15: 974 s on one H200"),
]


def _plan(model, h, w, f, steps, gpu, vram=None):
    return plan_for(gpu=gpu, model=model, height=h, width=w, frames=f, dtype="bf16", steps=steps,
                    vram_gb=vram, host_ram_gb=HOST)


def _floor(model, h, w, f) -> str:
    """The smallest reachable peak (a budget below every plan is refused with it) and what sets it."""
    try:
        _plan(model, h, w, f, 50, "RTX 4090", 0.25)
    except InfeasibleError as err:
        return f"{human_bytes(err.min_peak_bytes)} ({err.stage}: {err.part})"
    return "-"


def _verify(plan, components: list[str] | None) -> list:
    """Every sliced component of ``plan`` (or only ``components``: the VAE decode and encode take seconds
    where the DiT takes minutes) run on meta tensors of the full-size model."""
    from vramplan.runtime.verify import _build, _run, verify_all

    if not components:
        return verify_all(plan)
    return [_run(plan, c, _build(plan, c)) for c in plan.components if c.component in components]


def targets(verify: bool, components: list[str] | None = None) -> None:
    print("| model | size | budget | peak | floor (what sets it) | latency | all-resident | ratio | pinned host |"
          + (" verify (meta) |" if verify else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if verify else ""))
    for model, h, w, f, budget in TARGETS:
        # all-resident: the same GPU profile (compute, bandwidth, link) with memory for every weight
        full = _plan(model, h, w, f, 50, "RTX 4090", RESIDENT)
        size = f"{w}x{h}x{f}"
        try:
            plan = _plan(model, h, w, f, 50, "RTX 4090", budget)
        except InfeasibleError as err:
            print(f"| {model} | {size} | {budget} GiB | - | {human_bytes(err.min_peak_bytes)} ({err.stage}: {err.part}) "
                  f"| - | {full.prediction.latency_s:.0f} s | - | - |" + (" - |" if verify else ""))
            continue
        p = plan.prediction
        ratio = p.latency_s / full.prediction.latency_s
        low = _floor(model, h, w, f)
        row = (f"| {model} | {size} | {budget} GiB | {human_bytes(p.peak_bytes)} | {low} | {p.latency_s:.0f} s | "
               f"{full.prediction.latency_s:.0f} s | {ratio:.3f} | {human_bytes(p.host_bytes)} |")
        if verify:
            started = time.perf_counter()
            reports = _verify(plan, components)
            worst = max(abs(r.error or 0) for r in reports)
            each = ", ".join(f"{r.component} {r.measured_activation_bytes / GiB:.4f} GiB {r.error:+.2%}"
                             for r in reports if r.error is not None)
            row += f" max error {worst:.2%} ({each}; {time.perf_counter() - started:.0f} s) |"
        print(row)


def published() -> None:
    print("| run | card | published | predicted | predicted / published | plan |")
    print("|---|---|---|---|---|---|")
    for what, model, h, w, f, steps, gpu, seconds, source in PUBLISHED:
        try:
            plan = _plan(model, h, w, f, steps, gpu)
        except InfeasibleError as err:
            print(f"| {what} | {gpu} | {seconds} s | infeasible: {err} | - | - |")
            continue
        p = plan.prediction
        streamed = sum(len(c.streamed) for c in plan.components)
        how = f"peak {human_bytes(p.peak_bytes)}, {streamed} blocks streamed" if streamed else \
            f"peak {human_bytes(p.peak_bytes)}, all resident"
        print(f"| {what} ({source}) | {gpu} | {seconds} s | {p.latency_s:.0f} s | {p.latency_s / seconds:.2f} | {how} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify", action="store_true", help="verify each target plan on meta tensors")
    parser.add_argument("--components", help="with --verify: only these components (comma-separated, e.g. "
                        "vae,vae_encoder)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.system()}, python {platform.python_version()}\n")
    targets(args.verify, args.components.split(",") if args.components else None)
    print()
    published()


if __name__ == "__main__":
    main()
