"""Planner: solve times, and `verify` (meta tensors, full size) against the predicted peaks.

For every shipped pipeline profile (SVD 14f, SVD-XT 25f, AnimateDiff 16f at 576x1024 and 512x512,
CFG, fp16, both attention kernels) two plans are made on the matching GPU (efficient kernel: RTX
2080 Ti; flash: RTX 4090): the fastest plan within the GPU's memory, and the smallest-memory plan
within 1.2x that latency. Every sliced component (UNet, VAE decoder) is executed on meta tensors
of the full-size model and its measured activation peak is compared with the prediction.

    python bench/bench_planner.py
"""

from __future__ import annotations

import argparse

from report import machine, table, write_section
from vramplan.planner.plan import shipped_profiles
from vramplan.runtime.verify import verify_all

from vramplan import plan_for

GPUS = {"efficient": "2080Ti", "flash": "RTX 4090"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows, errors = [], []
    for name in shipped_profiles():
        stem = name.removesuffix(".pipeline.json")
        size = next(p for p in stem.split("-") if "x" in p and p[0].isdigit())
        model = stem[: stem.index(f"-{size}")]
        frames = int(stem.split("-f")[1].split("-")[0])
        kernel = stem.rsplit("-", 1)[1]
        h, w = (int(x) for x in size.split("x"))
        gpu = GPUS[kernel]
        fastest = plan_for(gpu=gpu, model=model, height=h, width=w, frames=frames)
        small = plan_for(gpu=gpu, model=model, height=h, width=w, frames=frames,
                         max_latency_s=fastest.prediction.latency_s * 1.2)
        for label, plan in (("fastest", fastest), ("min memory, <=1.2x latency", small)):
            for report in verify_all(plan):
                errors.append(abs(report.error))
                rows.append([
                    f"{model} {frames}f {h}x{w}", f"{plan.target.gpu} ({kernel})", label, report.component,
                    f"{report.predicted_activation_bytes / 2**30:.3f}", f"{report.measured_activation_bytes / 2**30:.3f}",
                    f"{report.error * 100:+.2f}%", f"{plan.prediction.peak_bytes / 2**30:.2f}",
                    f"{plan.solver.solve_seconds * 1000:.0f}",
                ])
                print(" | ".join(rows[-1]))
    body = "\n".join([
        "## Planner: prediction vs `verify`, solve time (`bench/bench_planner.py`)",
        "",
        f"Machine: {machine()}. `verify` executes each sliced component of the plan on meta tensors of "
        "the full-size model and measures its activation peak with the MemoryTracker; `predicted` is the "
        "plan's own number. `pipeline peak` is the plan's whole-run prediction (CUDA context, weights on the "
        "GPU, held tensors, modelled allocator overhead, margin). `solve ms`: the final ILPs (PuLP/CBC) of the "
        "sliced stages, candidate segments included; residency is searched with the exact DP.",
        "",
        table(["config", "GPU", "objective", "component", "predicted GiB", "measured GiB", "error",
               "pipeline peak GiB", "solve ms"], rows),
        "",
        f"Largest |error|: {max(errors) * 100:.2f}% over {len(errors)} plans (target: 5%).",
    ])
    print(body)
    if not args.no_write:
        print("wrote", write_section("planner", body))


if __name__ == "__main__":
    main()
