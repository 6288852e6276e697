"""Planner: solve times, and `verify` (meta tensors, full size) against the predicted peak.

For every shipped profile (SVD 14f / SVD-XT 25f, 576x1024 and 512x512, CFG, fp16, both attention
kernels) two plans are made on the matching GPU (efficient kernel: RTX 2080 Ti; flash: RTX 4090):
the fastest plan within the GPU's memory, and the smallest-memory plan within 1.2x that latency.
Each is executed on meta tensors of the full-size UNet and its measured activation peak is
compared with the prediction.

    python bench/bench_planner.py
"""

from __future__ import annotations

import argparse

from report import machine, table, write_section
from vramplan.planner.plan import shipped_profiles
from vramplan.runtime.verify import verify

from vramplan import plan_for

GPUS = {"efficient": "2080Ti", "flash": "RTX 4090"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows, errors = [], []
    for name in shipped_profiles():
        model, rest = name.split("-", 1) if not name.startswith("svd-xt") else ("svd-xt", name[7:])
        size, frames, _, _, kernel = rest.removesuffix(".profile.json").split("-")
        h, w = (int(x) * 8 for x in size.split("x"))
        gpu = GPUS[kernel]
        fastest = plan_for(gpu=gpu, model=model, height=h, width=w)
        small = plan_for(gpu=gpu, model=model, height=h, width=w, max_latency_s=fastest.prediction.latency_s * 1.2)
        for label, plan in (("fastest", fastest), ("min memory, <=1.2x latency", small)):
            report = verify(plan)
            errors.append(abs(report.error))
            pred = plan.prediction
            rows.append([
                f"{model} {frames[1:]}f {h}x{w}", f"{plan.target.gpu} ({kernel})", label,
                f"{pred.original_activation_peak_bytes / 2**30:.2f}", f"{pred.activation_peak_bytes / 2**30:.3f}",
                f"{report.measured_activation_bytes / 2**30:.3f}", f"{report.error * 100:+.2f}%",
                f"{pred.peak_bytes / 2**30:.2f}", f"{plan.solver.solve_seconds * 1000:.0f}",
            ])
            print(" | ".join(rows[-1]))
    body = "\n".join([
        "## Planner: prediction vs `verify`, solve time (`bench/bench_planner.py`)",
        "",
        f"Machine: {machine()}. `verify` executes the plan on meta tensors of the full-size UNet and "
        "measures the activation peak with the MemoryTracker; `predicted` is the plan's own number. "
        "`total` adds CUDA context, weights, modelled allocator overhead and margin. Solve: PuLP/CBC ILP "
        "(includes building ~1,200-2,000 candidate segments).",
        "",
        table(["config", "GPU", "objective", "original GiB", "predicted GiB", "measured GiB", "error",
               "total GiB", "solve ms"], rows),
        "",
        f"Largest |error|: {max(errors) * 100:.2f}% over {len(errors)} plans (target: 5%).",
    ])
    print(body)
    if not args.no_write:
        print("wrote", write_section("planner", body))


if __name__ == "__main__":
    main()
