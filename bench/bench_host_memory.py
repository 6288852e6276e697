"""Pinned host memory: the plan's prediction against execution, on meta tensors of the full-size models.

Plans that place values in host memory or stream weights (small GPUs and memory limits) are made
from the shipped profiles; every sliced component is executed on meta tensors by ``verify``, whose
tracker counts the host buffers the call allocates (host-placed values) and adds the streamed
blocks' host weights. ``predicted`` is the plan's per-stage ``host_bytes``; ``live ranges`` is what
the planner said before it followed buffer reuse (each placed value held from its unit to its last
reader, as if none shared a buffer).

    python bench/bench_host_memory.py
"""

from __future__ import annotations

import argparse

from report import machine, table, write_section
from vramplan.planner.costs import CostModel
from vramplan.planner.gpus import find_gpu
from vramplan.planner.integrity import shipped_profile
from vramplan.planner.plan import segments_of
from vramplan.runtime.verify import verify_all

from vramplan import plan_for

CASES = [  # (label, plan_for arguments)
    ("svd-xt 25f 576x1024, 4 GB laptop", dict(gpu="RTX 3050 Laptop", model="svd-xt")),
    ("svd 14f 576x1024, 4 GB laptop", dict(gpu="RTX 3050 Laptop", model="svd")),
    ("svd-xt 25f 576x1024, 5 GiB", dict(gpu="RTX 4090", model="svd-xt", vram_gb=5)),
    ("svd 14f 576x1024, 4 GiB", dict(gpu="RTX 4090", model="svd", vram_gb=4)),
    ("svd 14f 512x512, 5 GiB", dict(gpu="2080Ti", model="svd", height=512, width=512, vram_gb=5)),
    ("animatediff 16f 576x1024, 4 GiB", dict(gpu="RTX 4090", model="animatediff", vram_gb=4)),
]


def live_ranges(model: CostModel, host) -> int:
    """The former accounting: every placed value from its unit to its last reader, summed at the peak."""
    delta = [0] * (model.n + 2)
    for v in host:
        delta[model.producer[v]] += model.size[v]
        delta[min(model.last_use[v], model.n) + 1] -= model.size[v]
    peak = running = 0
    for d in delta:
        running += d
        peak = max(peak, running)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows, errors = [], []
    for label, kwargs in CASES:
        plan = plan_for(**kwargs)
        profiles = {s.component: s.profile for s in shipped_profile(plan).stages if s.profile is not None}
        gpu = find_gpu(plan.target.gpu)
        for report in verify_all(plan):
            if report.predicted_host_bytes is None:
                continue  # a stage that runs whole: no host memory
            comp = plan.component(report.component)
            model = CostModel(profiles[comp.component], gpu, plan.target.allocator)
            streamed = model.streamed_weight_bytes(frozenset(comp.streamed))
            before = live_ranges(model, comp.host) + streamed
            error = report.host_error or 0.0
            errors.append(abs(error))
            segs = len(segments_of(model, comp))
            rows.append([
                label, report.component, len(comp.host), len(comp.streamed), segs,
                f"{before / 2**30:.3f}", f"{report.predicted_host_bytes / 2**30:.3f}",
                f"{report.measured_host_bytes / 2**30:.3f}", f"{error * 100:+.2f}%",
                f"{plan.prediction.host_bytes / 2**30:.2f}",
            ])
            print(" | ".join(map(str, rows[-1])))
    body = "\n".join([
        "## Pinned host memory: prediction vs execution (`bench/bench_host_memory.py`)",
        "",
        f"Machine: {machine()}. Each sliced component of the plan runs on meta tensors of the full-size "
        "model (`verify`); the tracker counts the host buffers the call allocates (values placed in host "
        "memory) and the streamed blocks' host weights are added. `predicted` is the plan's stage "
        "`host_bytes`, following the executor's buffers (a host output written over a dying host input's "
        "buffer allocates nothing); `live ranges` is the former accounting, which added every placed value "
        "from its unit to its last reader. `run total` is the plan's pinned host memory for the whole run "
        "(every streamed block + the largest stage's placed values), which `plan_for(host_ram_gb=)` bounds.",
        "",
        table(["plan", "component", "host values", "streamed blocks", "segments", "live ranges GiB",
               "predicted GiB", "measured GiB", "error", "run total GiB"], rows),
        "",
        f"Largest |error|: {max(errors) * 100:.2f}% over {len(errors)} components (target: 1%).",
    ])
    print(body)
    if not args.no_write:
        print("wrote", write_section("host_memory", body))


if __name__ == "__main__":
    main()
